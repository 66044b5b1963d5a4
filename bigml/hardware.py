"""What the machine can do: the fastest correct precision, and the peak FLOP/s MFU is measured against."""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from pathlib import Path

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine")


def resolve_accelerator(accelerator: str) -> str:
    import torch

    if accelerator in ("auto", None):
        if torch.cuda.is_available():
            return "gpu"
        return "cpu"  # MPS is opt-in (trainer.accelerator=mps): op coverage still varies by release
    return "gpu" if accelerator == "cuda" else str(accelerator)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    return cpu_bf16_verdict()[0]


@functools.lru_cache(maxsize=1)
def cpu_bf16_verdict() -> tuple[bool, str]:
    """Whether bf16 matmuls beat fp32 on this CPU, the condition for bf16 autocast to pay off.

    AMX (Sapphire Rapids and later) runs them ~3x faster than fp32: yes without measuring.
    AVX512-BF16 alone is not enough: on such a 2-core Xeon bf16 matmuls measured 0.6x fp32, and
    pretraining in bf16 ran 1.5x slower (BENCHMARKS.md), so there a quick matmul race decides.
    Without either, bf16 is emulated and slower.
    """
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True, "AMX: bf16 matmuls in hardware"
    if "avx512_bf16" not in flags:
        return False, "no AMX or AVX512-BF16: bf16 would be emulated"
    import torch

    fp32 = bf16 = 0.0
    for _ in range(2):  # interleaved, best of each: other jobs on the machine slow both alike
        fp32 = max(fp32, measure_cpu_peak_flops(torch.float32, n=1024, seconds=0.1))
        bf16 = max(bf16, measure_cpu_peak_flops(torch.bfloat16, n=1024, seconds=0.1))
    log.debug("bf16 matmul %.0f GFLOP/s vs fp32 %.0f GFLOP/s", bf16 / 1e9, fp32 / 1e9)
    return bf16 > 1.2 * fp32, (f"AVX512-BF16 without AMX: bf16 matmuls measured {bf16 / max(fp32, 1):.2f}x fp32 "
                               f"at start-up (bf16 needs > 1.2x)")


def precision_reason(requested: str, accelerator: str, resolved: str) -> str:
    """Why `trainer.precision=requested` became `resolved`: the line metrics.json keeps."""
    import torch

    if str(requested) != "auto":
        return f"{resolved} (trainer.precision={requested})"
    acc = resolve_accelerator(accelerator)
    if acc == "gpu" and torch.cuda.is_available():
        return f"{resolved} (auto on a GPU: bf16 where the GPU supports it, else fp16)"
    if acc == "cpu":
        return f"{resolved} (auto: {cpu_bf16_verdict()[1]})"
    return f"{resolved} (auto)"


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto` -> the fastest precision that trains correctly on this hardware."""
    import torch

    precision = str(precision)
    if precision != "auto":
        return precision
    acc = resolve_accelerator(accelerator)
    if acc == "gpu" and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if acc == "cpu" and cpu_has_fast_bf16():
        return "bf16-mixed"
    return "32-true"


def compute_dtype(precision: str):
    import torch

    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak_flops(dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of a large square matmul: the practical peak of this CPU for `dtype`."""
    import torch

    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (thread pool, kernel selection)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def peak_flops(accelerator: str, precision: str, cache_dir: str | None = None) -> float | None:
    """Peak FLOP/s per device: Lightning's table for GPUs, the best measured matmul for CPUs."""
    import torch

    dtype = compute_dtype(precision)
    acc = resolve_accelerator(accelerator)
    if acc == "gpu" and torch.cuda.is_available():
        from lightning_fabric.utilities.throughput import get_available_flops

        return get_available_flops(torch.device("cuda"), dtype)
    if acc != "cpu":
        return None
    key = f"{cpu_name()}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__}"
    cache = Path(cache_dir).expanduser() / "cpu_peak_flops.json" if cache_dir else None
    known = {}
    if cache and cache.exists():
        try:
            known = json.loads(cache.read_text())
        except ValueError:
            known = {}
    # A peak is a maximum: a measurement taken while other jobs share the CPU comes out low (and
    # MFU above 100% follows), so every run measures again and the cache keeps the best seen.
    measured = measure_cpu_peak_flops(dtype, seconds=0.3)
    if measured > float(known.get(key, 0.0)):
        known[key] = measured
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, cache)
    return float(known[key])


def flops_per_token(config, seq_len: int) -> float | None:
    """Training FLOPs per token: 6N for the matmuls of the non-embedding parameters (forward 2N,
    backward 4N) plus 12 * layers * hidden * seq_len for attention scores (Kaplan et al. / PaLM)."""
    d = config.to_dict()
    layers = d.get("num_hidden_layers", d.get("n_layer"))
    hidden = d.get("hidden_size", d.get("n_embd"))
    heads = d.get("num_attention_heads", d.get("n_head"))
    if layers is None or hidden is None or heads is None:
        return None  # not a transformer (an LSTM, say): no MFU is reported
    inter = d.get("intermediate_size", d.get("n_inner")) or 4 * hidden
    kv_heads = d.get("num_key_value_heads") or heads
    head_dim = hidden // heads
    attn = hidden * (heads * head_dim) * 2 + hidden * (kv_heads * head_dim) * 2  # q, o, k, v
    gated = d.get("model_type") == "llama"
    mlp = (3 if gated else 2) * hidden * inter
    n_non_embedding = layers * (attn + mlp)
    # the output projection over the vocabulary is a real matmul even when tied to the embeddings
    n_matmul = n_non_embedding + hidden * config.vocab_size
    return 6 * n_matmul + 12 * layers * hidden * seq_len


def tune_malloc() -> bool:
    """Opt-in (BIGML_MALLOC_TUNING=1): keep freed memory in the process instead of returning it.

    glibc serves blocks above 32 MB (a step's logits over the vocabulary, their gradients) with
    mmap and unmaps them on free, so each step page-faults them back in; turning mmap off and never
    trimming avoids that, which made fp32 steps faster on the machine it was first measured on. But
    the heap then fragments around those blocks and keeps every page it ever held, so resident
    memory grows step after step to several times the live peak. It is therefore off by default;
    BENCHMARKS.md (memory section, scripts/bench_memory.py) measures both settings side by side.
    """
    if os.environ.get("BIGML_MALLOC_TUNING", "0") != "1" or platform.system() != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 1 << 34) == 1
        return bool(ok)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
