"""How `bigml generate` makes decoding fast on the machine it runs on, and why.

Decoding one token at a time is bound by memory: every step reads every weight once (a 135M-parameter
model in fp32 reads 540 MB per token) for a few matrix-vector products. What helps is reading fewer
bytes (bf16 weights, int8 / int4 weight-only quantization through torchao), not paying Python for
each of the few hundred small operations of a step (torch.compile with a static KV cache), and
not losing the CPU to threads that wait for each other. Which of these pays depends on the
hardware, so each default is decided here by a short measurement or a stated rule, and every
decision is returned with its reason (`Plan.reasons`) for the log line and the metrics dict:

- precision=auto on a CPU: bf16 when a race between fp32 and bf16 over the model's largest matrix
  (usually the output layer), at the batch's width, says bf16 is faster; else fp32. Quantized
  weights always compute in bf16 on CPUs (torchao's CPU kernels run fp32 activations many times
  slower).
- threads=auto on a CPU: a race of one-token forward passes with 1 thread against one per core.
  On an idle machine more threads win; on a busy one (other jobs on the cores) a thread that waits
  for a descheduled sibling at each of the step's synchronization points loses (BENCHMARKS.md:
  torch's default threads against 1 thread).
- compile=auto: torch.compile (Inductor) with a static KV cache where it pays back, which on the
  CPUs measured here is int8 weights only: torchao's eager int8 path dequantizes each matrix at
  every step, compiled Inductor runs one int8 matrix-vector kernel. For bf16 and int4 the
  compiled step measured no reliably faster than eager (BENCHMARKS.md) for tens of seconds of
  compiling, so auto leaves them eager; compile=true compiles them, with Inductor's caches under
  `<cache_dir>/inductor` (a warm cache makes the next compile much shorter: BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bigml.errors import ConfigError

log = logging.getLogger("bigml")

QUANTIZE = ("none", "int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)  # torchao's int4 CPU kernel: one scale per group of input features


@dataclass
class Plan:
    """What decoding runs with: dtype, threads (None: left alone), weight format, compile, and why."""

    dtype: torch.dtype
    threads: int | None
    quantize: str = "none"
    compile: bool = False
    compile_cache_dir: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        return {"precision": str(self.dtype).removeprefix("torch."), "threads": self.threads,
                "quantize": self.quantize, "compile": self.compile, "decisions": dict(self.reasons)}

    def describe(self) -> str:
        return " | ".join(f"{k} {v}" for k, v in self.reasons.items())


def parse_threads(value: Any) -> int | str:
    if value is None or str(value) == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(value).strip() != str(n):
        raise ConfigError("threads", f"{value!r} is not auto or a number of threads >= 1")
    return n


def parse_compile(value: Any) -> bool | str:
    text = str(value).lower()
    if text in ("auto", "none"):
        return "auto"
    if text in ("true", "false"):
        return text == "true"
    raise ConfigError("compile", f"{value!r} is not auto, true or false")


def parse_quantize(value: Any) -> str:
    text = "none" if value is None else str(value).lower()
    if text not in QUANTIZE:
        raise ConfigError("quantize", f"{value!r} is not one of {', '.join(QUANTIZE)}",
                          "int8 / int4: weight-only quantization through torchao")
    return text


# -- measurements --------------------------------------------------------------------------------

def _best_of(fns: dict[Any, Any], rounds: int, setup=None) -> dict[Any, float]:
    """Seconds of each callable: the best of `rounds`, the callables interleaved so that other
    work on a shared CPU slows them alike (the first call of each is a warm-up)."""
    best = dict.fromkeys(fns, float("inf"))
    for r in range(rounds + 1):
        for key, fn in fns.items():
            if setup is not None:
                setup(key)
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r:
                best[key] = min(best[key], dt)
    return best


RACE_BYTES = 256 * 2**20  # fp32 bytes of weights the precision race streams: beyond any CPU cache


def _step_matrices(model) -> list[torch.Tensor]:
    """The matrices a decoding step multiplies by, in the order it does (input embeddings, of which a
    step reads one row, excluded unless tied to the output layer), up to RACE_BYTES in fp32."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(inp.weight)} if inp is not None and (out is None or out.weight is not inp.weight) else set()
    mats, total, seen = [], 0, set()
    for p in model.parameters():
        if p.dim() != 2 or id(p) in skip or id(p) in seen or total >= RACE_BYTES:
            continue
        seen.add(id(p))
        mats.append(p)
        total += p.numel() * 4
    return mats


def race_precision(model, rows: int = 1, rounds: int = 5, cache_dir: str | None = None) -> tuple[torch.dtype, str]:
    """fp32 against bf16: `rows` vectors times each of the model's own matrices, as in a decoding step.

    The whole set of matrices, not one: a model whose weights fit in the CPU's caches runs matrix-
    vector products at cache speed, where bf16 may gain nothing, while one that streams its weights
    from memory is bound by bytes, where bf16 reads half. One thread: the per-thread verdict, before
    threads are chosen.

    The verdict is a property of the CPU and the model's shape, not of the moment (both sides are
    slowed alike by other work), so it is kept in `<cache_dir>/decode_precision.json`: the same
    command on the same machine then decodes in the same precision, with the same greedy text."""
    from bigml.hardware import cpu_name

    mats = _step_matrices(model)
    n_params = sum(m.numel() for m in mats)
    what = f"{rows} vector{'s' if rows > 1 else ''} times the model's {len(mats)} matrices ({n_params / 1e6:.1f}M weights)"
    shapes = hashlib.sha256(str([tuple(m.shape) for m in mats]).encode()).hexdigest()[:12]
    key = f"{cpu_name()}|{shapes}|rows={rows}|torch={torch.__version__}"
    cache = Path(cache_dir).expanduser() / "decode_precision.json" if cache_dir else None
    known = _read_json(cache, {})
    if key in known:
        ratio, how = float(known[key]), "measured earlier on this CPU"
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                w32 = [m.detach().float() for m in mats]
                w16 = [m.to(torch.bfloat16) for m in w32]
                gen = torch.Generator().manual_seed(0)  # its own stream: generate's seed= must not see the race
                x32 = {k: torch.randn(rows, k, generator=gen) for k in {m.shape[1] for m in mats}}
                x16 = {k: v.to(torch.bfloat16) for k, v in x32.items()}
                lin = torch.nn.functional.linear
                t = _best_of({"fp32": lambda: [lin(x32[w.shape[1]], w) for w in w32],
                              "bf16": lambda: [lin(x16[w.shape[1]], w) for w in w16]}, rounds)
        finally:
            torch.set_num_threads(before)
        ratio, how = t["fp32"] / t["bf16"], "measured"
        if cache is not None:
            _write_json(cache, {**known, key: round(ratio, 3)})
    dtype = torch.bfloat16 if ratio > 1.1 else torch.float32
    return dtype, f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} ({what}: bf16 at {ratio:.2f}x fp32's speed, {how})"


def _read_json(path: Path | None, default):
    try:
        return json.loads(path.read_text()) if path is not None and path.exists() else default
    except (OSError, ValueError):
        return default


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


@torch.inference_mode()
def race_threads(model, rows: int = 1, rounds: int = 2) -> tuple[int, str]:
    """One-token forward passes (the shape of a decoding step) with 1 thread against one per core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    candidates = sorted({1, cores})
    if len(candidates) == 1:
        torch.set_num_threads(candidates[0])
        return candidates[0], f"{candidates[0]} (one core)"
    ids = torch.full((rows, 1), 1, dtype=torch.long, device=model.device)
    t = _best_of({c: lambda: model(input_ids=ids, use_cache=False) for c in candidates}, rounds,
                 setup=torch.set_num_threads)
    best = min(t, key=t.get)
    torch.set_num_threads(best)
    timings = ", ".join(f"{c}: {t[c] * 1000:.0f} ms" for c in candidates)
    return best, f"{best} (one-token forward pass, {timings}, measured)"


# -- weights ------------------------------------------------------------------------------------

def _int4_packable(m) -> bool:
    """torchao's CPU int4 layout packs output rows by 16 (`_convert_weight_to_int4pack_cpu`)."""
    return isinstance(m, torch.nn.Linear) and m.out_features % 16 == 0


def int4_group_size(model) -> int | None:
    """The largest group size that divides the input width of every packable linear layer (576-wide
    SmolLM layers take 64, not torchao's default 128, which would leave most layers unquantized)."""
    widths = {m.in_features for m in model.modules() if _int4_packable(m)}
    return next((g for g in INT4_GROUP_SIZES if widths and all(w % g == 0 for w in widths)), None)


def quantize_weights(model, kind: str, device: str) -> str:
    """Weight-only quantization of every linear layer (the output layer included) through torchao."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    if kind == "int8":
        quantize_(model, Int8WeightOnlyConfig())
        return "int8 weight-only, one scale per output row (torchao)"
    if device != "cpu":
        raise ConfigError("quantize", "int4 runs on CPUs here (torchao's CPU int4 kernel)", "use quantize=int8 on GPUs")
    group = int4_group_size(model)
    if group is None:
        raise ConfigError("quantize", "int4 needs linear layers whose input width is a multiple of 32",
                          "use quantize=int8")
    # the CPU layout (tinygemm's _weight_int4pack_mm_for_cpu) lives in torchao's prototype namespace
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    left = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not _int4_packable(m)]
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group), filter_fn=lambda m, _: _int4_packable(m))
    kept = f"; left in {str(model.dtype).removeprefix('torch.')}: {', '.join(left)} (outputs not a multiple of 16)" if left else ""
    return f"int4 weight-only, groups of {group} (torchao){kept}"


def weight_bytes(model) -> int:
    """Bytes of the weights a decoding step reads (quantized tensors count their packed data)."""
    seen, total = set(), 0
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inp is not None and (out is None or out.weight is not inp.weight):
        seen.add(id(inp.weight))  # untied input embeddings: one row per token, not the matrix
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        inner = [getattr(p, a) for a in getattr(p, "tensor_data_names", [])] or [p]
        total += sum(t.numel() * t.element_size() for t in inner if isinstance(t, torch.Tensor))
    return total


# -- compilation --------------------------------------------------------------------------------

@contextlib.contextmanager
def inductor_cache(cache_dir: str | None) -> Iterator[None]:
    """Inductor's FX-graph and AOT caches under bigml's cache directory for the duration (torch's
    own context manager, which puts TORCHINDUCTOR_CACHE_DIR back afterwards)."""
    if cache_dir is None:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with temporary_cache_dir(cache_dir):
        yield


def decide_compile(requested: bool | str, quantize: str) -> tuple[bool, str]:
    if requested is True:
        return True, "on (compile=true)"
    if requested is False:
        return False, "off (compile=false)"
    if quantize == "int8":
        return True, "on (int8 weights: eager torchao int8 dequantizes every matrix at every step)"
    return False, ("off (compile=auto: compiled bf16 / int4 decoding measured no reliably faster than eager on "
                   "CPU, BENCHMARKS.md, for tens of seconds of compiling; compile=true compiles, cached in "
                   "cache_dir/inductor)")


# -- precision names --------------------------------------------------------------------------

def resolve_dtype(precision: str, device: str) -> torch.dtype:
    """`auto`: bf16 (fp16 without bf16) on GPUs; fp32 on CPUs, where causal-LM decoding then races
    fp32 against bf16 on the model itself (bigml.decode_speed.prepare) and may switch to bf16.

    Weights are cast, not autocast.
    """
    names = {"fp32": torch.float32, "32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "16": torch.float16, "float16": torch.float16}
    precision = str(precision)
    if precision == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in names:
        raise ConfigError("precision", f"unknown precision {precision!r}", "choose auto, fp32, bf16 or fp16")
    return names[precision]


# -- the whole plan -----------------------------------------------------------------------------

def _already_quantized(model) -> str | None:
    """What a model loaded already quantized (bigml compress, or a checkpoint saved through
    transformers' quantization) says it is; None for float weights."""
    config = getattr(model, "config", None)
    bigml_q = getattr(config, "bigml_quantization", None)
    if bigml_q:
        return str(bigml_q.get("scheme") if isinstance(bigml_q, dict) else bigml_q)
    q = getattr(config, "quantization_config", None)
    if q:
        return str(getattr(q, "quant_method", None) or (q.get("quant_method") if isinstance(q, dict) else "quantized"))
    return None


def prepare(model, device: str, precision: str, quantize: str = "none", threads: Any = "auto",
            compile: Any = "auto", rows: int = 1, cache_dir: str | None = None):
    """Cast, quantize and place `model` for decoding `rows` sequences at a time over `steps` steps
    in all; (model, Plan). The model is changed in place (cast and quantized)."""
    quantize = parse_quantize(quantize)
    threads = parse_threads(threads)
    compile = parse_compile(compile)
    reasons: dict[str, str] = {}
    cpu = device == "cpu"
    prequantized = _already_quantized(model)
    if prequantized and quantize != "none":
        raise ConfigError("quantize", f"the model is already quantized ({prequantized})",
                          "drop quantize= (or start from the unquantized model)")
    if str(precision) == "auto" and cpu:
        if prequantized:
            # its quantized kernels fixed their activations' dtype when it was saved; fp32 is what
            # every scheme bigml writes accepts (torch.ao's dynamic int8 takes nothing else)
            dtype, reasons["precision"] = torch.float32, f"float32 (weights already quantized: {prequantized})"
        elif quantize != "none":
            dtype, reasons["precision"] = torch.bfloat16, "bf16 (activations of quantized weights)"
        else:
            dtype, reasons["precision"] = race_precision(model, rows=max(rows, 1), cache_dir=cache_dir)
    else:
        dtype = resolve_dtype(str(precision), device)
        reasons["precision"] = f"{str(dtype).removeprefix('torch.')} (precision={precision})"
        if cpu and quantize != "none" and dtype == torch.float32:
            log.warning("warning: precision=fp32 with quantize=%s: torchao's CPU kernels are much slower with "
                        "fp32 activations than bf16 (precision=auto picks bf16)", quantize)
    model = model.to(device=device, dtype=dtype).eval()
    if quantize != "none":
        reasons["quantize"] = quantize_weights(model, quantize, device)
    n_threads: int | None = None
    if cpu:
        if threads == "auto":
            n_threads, reasons["threads"] = race_threads(model, rows=max(rows, 1))
        else:
            n_threads = int(threads)
            torch.set_num_threads(n_threads)
            reasons["threads"] = f"{n_threads} (threads={n_threads})"
    inductor_dir = str(Path(cache_dir).expanduser() / "inductor") if cache_dir else None
    on, reasons["compile"] = decide_compile(compile, quantize)
    reasons["weights"] = f"{weight_bytes(model) / 1e6:.0f} MB read per decoding step"
    return model, Plan(dtype, n_threads, quantize, on, inductor_dir, reasons)
