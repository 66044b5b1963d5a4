"""What the compress report measures, the same way for every stage.

    params       weights the model computes with (a quantized Linear counts its in x out weights)
    size_mb      bytes of the weight files on disk (safetensors), / 1e6
    linear_mb    bytes the Linear layers' weights take in memory (int8 / int4 + scales when quantized)
    sparsity     share of exactly-zero weights in the Linear layers
    latency_ms   median forward time of one batch of `measure.batch_size` x `measure.seq_len` tokens,
                 after `measure.warmup` untimed runs, on `threads` CPU threads (torch's setting)
    throughput   sequences per second at that shape (batch_size / latency)
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from bigml.compression import storage
from bigml.progress import track


def example_batch(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> tuple[dict, int]:
    """Random token ids (the same for every stage) and the sequence length actually used (capped by
    the model's positions)."""
    cfg = model.config.to_dict()
    max_pos = cfg.get("max_position_embeddings") or cfg.get("n_positions") or seq_len
    seq = min(int(seq_len), int(max_pos))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, max(int(model.config.vocab_size) - 1, 6), (int(batch_size), seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return batch, seq


def _forward_kwargs(model: nn.Module, batch: dict) -> dict:
    kw = dict(batch)
    if getattr(model.config, "is_decoder", False) or "CausalLM" in type(model).__name__:
        kw["use_cache"] = False
    return kw


def latency(model: nn.Module, batch: dict, warmup: int, repeats: int) -> float:
    """Median seconds per forward."""
    kw = _forward_kwargs(model, batch)
    with torch.inference_mode():
        for _ in range(max(warmup, 0)):
            model(**kw)
        times = []
        for _ in track(range(max(repeats, 1)), "timing forwards", unit="runs"):
            t0 = time.perf_counter()
            model(**kw)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def linear_stats(model: nn.Module) -> dict:
    """Parameter count, Linear weight bytes and zero share, looking inside quantized modules."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    params = 0
    linear_bytes = 0
    zeros = total = 0
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, DynLinear):
            w = mod.weight()
            params += w.numel() + (mod.bias().numel() if mod.bias() is not None else 0)
            per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
            # int8 weights + one fp32 scale per output channel (as stored on disk)
            linear_bytes += w.numel() + (w.q_per_channel_scales().numel() * 4 if per_channel else 4)
            zp = w.q_per_channel_zero_points().unsqueeze(1) if per_channel else w.q_zero_point()
            zeros += int((w.int_repr() == zp).sum())
            total += w.numel()
            continue
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            params += p.numel()
        if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
            w = mod.weight
            linear_bytes += _tensor_bytes(w)
            zeros += int(_count_zeros(w))
            total += w.numel()
    return {"params": params, "linear_mb": round(linear_bytes / 1e6, 3),
            "sparsity": round(zeros / total, 4) if total else 0.0}


def _tensor_bytes(w: torch.Tensor) -> int:
    """Storage of a (possibly torchao-quantized) weight: its inner tensors' bytes."""
    t = w.data if isinstance(w, nn.Parameter) else w
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _count_zeros(w: torch.Tensor) -> int:
    inner = w.data if isinstance(w, nn.Parameter) else w
    if type(inner) is not torch.Tensor:
        try:
            inner = inner.dequantize()
        except Exception:  # noqa: BLE001 - a tensor subclass without dequantize: not counted
            return 0
    return int((inner == 0).sum())


def measure(model: nn.Module, model_dir: str | Path, *, batch_size: int, seq_len: int, warmup: int,
            repeats: int, params: int | None = None) -> dict:
    batch, seq = example_batch(model, batch_size, seq_len)
    seconds = latency(model, batch, warmup, repeats)
    stats = linear_stats(model)
    return {
        "params": int(params if params is not None else stats["params"]),
        "size_mb": round(storage.weight_bytes(model_dir) / 1e6, 3),
        "linear_mb": stats["linear_mb"],
        "sparsity": stats["sparsity"],
        "latency_ms": round(seconds * 1000, 2),
        "throughput": round(batch_size / seconds, 2),
        "batch_size": int(batch_size),
        "seq_len": seq,
        "threads": torch.get_num_threads(),
    }
