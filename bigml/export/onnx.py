"""ONNX export of task models and language models: token ids in, logits out.

    export(model, tokenizer, path, exporter)   torch.onnx.export of a wrapper that takes the
                                               tokenizer's tensors (input_ids, attention_mask,
                                               token_type_ids when the tokenizer makes them) and
                                               returns the logits; batch and sequence length dynamic
    parity(model, path, ...)                   onnxruntime against PyTorch on several shapes, padded
                                               rows included: the largest absolute logit difference
    latency(model, path, ...)                  median forward time of both at one shape

exporter=dynamo is torch's maintained exporter (torch.export + onnxscript); exporter=torchscript is
the legacy tracer (deprecated upstream, about 10x faster to export, no onnxscript needed). Both
give the same graph semantics; the parity check runs whichever is used. optimum's exporter
(optimum-onnx) does not install beside transformers 5, so torch's own is used directly.

Decoders are exported without a KV cache: the graph computes the logits of every position of the
sequence given (scoring, classification heads, or decoding that re-runs the prefix).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bigml")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EXPORTERS = ("dynamo", "torchscript")


class LogitsOnly(torch.nn.Module):
    """The model as a function of tensors to logits (no cache, no dict output), what ONNX needs."""

    def __init__(self, model, names: tuple[str, ...], causal: bool):
        super().__init__()
        self.model, self.names, self.causal = model, names, causal

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        kw = {n: given[n] for n in self.names}
        if self.causal:
            kw["use_cache"] = False
        return self.model(**kw, return_dict=True).logits


def input_names(tokenizer, model) -> tuple[str, ...]:
    """The inputs the tokenizer produces and the model's forward takes."""
    import inspect

    params = inspect.signature(model.forward).parameters
    made = set(getattr(tokenizer, "model_input_names", None) or ("input_ids", "attention_mask"))
    return tuple(n for n in INPUTS if n in params and (n == "input_ids" or n in made))


def per_position(model) -> bool:
    """Whether the logits have a sequence axis (language models, token tags) or not (one per text)."""
    ids = torch.zeros(1, 3, dtype=torch.long)
    with torch.inference_mode():
        return model(input_ids=ids).logits.dim() == 3


def sample_inputs(names: tuple[str, ...], batch: int, seq: int, vocab: int, seed: int, pad: bool = True) -> dict[str, torch.Tensor]:
    """Random token ids (the first 5 ids, usually special tokens, left out); with `pad`, the last row
    of a batch is padded on the right for half its length."""
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=g)}
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1:
        mask[-1, seq // 2:] = 0
    if "attention_mask" in names:
        out["attention_mask"] = mask
    if "token_type_ids" in names:
        out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return out


def export(model, tokenizer, path: Path, exporter: str = "dynamo", opset: int = 18, causal: bool = False) -> tuple[str, ...]:
    """Write model.onnx; returns the input names of the graph."""
    names = input_names(tokenizer, model)
    wrapped = LogitsOnly(model.eval(), names, causal).eval()
    example = sample_inputs(names, 2, 16, model.config.vocab_size, seed=0, pad=False)
    seq_axis = per_position(model)
    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
        if exporter == "dynamo":
            program = torch.onnx.export(
                wrapped, (), kwargs=example, dynamo=True, input_names=list(names), output_names=["logits"],
                opset_version=opset, dynamic_shapes={n: {0: "batch", 1: "sequence"} for n in names}, optimize=True,
                verbose=False)
            program.save(str(path))
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in names}
            axes["logits"] = {0: "batch", 1: "sequence"} if seq_axis else {0: "batch"}
            torch.onnx.export(wrapped, (), str(path), kwargs=example, dynamo=False, opset_version=min(opset, 17), input_names=list(names),
                              output_names=["logits"], dynamic_axes=axes)
    return names


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


SHAPES = ((1, 7), (2, 16), (4, 33), (3, 64))


def parity(model, path: Path, names: tuple[str, ...], max_len: int | None, causal: bool) -> dict:
    """Largest |onnxruntime - PyTorch| logit over SHAPES (capped by the model's positions), at the
    positions that are not padding (a padded position's logits mean nothing), and the scale of the
    logits (so the difference reads against it)."""
    sess = session(path)
    worst, scale, shapes = 0.0, 0.0, []
    per_pos = per_position(model)
    for i, (b, s) in enumerate(SHAPES):
        s = min(s, max_len) if max_len else s
        x = sample_inputs(names, b, s, model.config.vocab_size, seed=100 + i)
        with torch.inference_mode():
            kw = {"use_cache": False} if causal else {}
            ref = model(**x, **kw).logits.float().numpy()
        got = sess.run(["logits"], {n: x[n].numpy() for n in names})[0]
        keep = x["attention_mask"].numpy().astype(bool) if per_pos and "attention_mask" in x else np.ones(ref.shape[:-1], bool)
        worst = max(worst, float(np.abs(ref - got)[keep].max()))
        scale = max(scale, float(np.abs(ref[keep]).max()))
        shapes.append([b, s])
    return {"max_abs_diff": worst, "max_abs_logit": scale, "shapes": shapes}


def latency(model, path: Path, names: tuple[str, ...], batch: int, seq: int, repeats: int, causal: bool) -> dict:
    """Median forward time of PyTorch (eager) and onnxruntime on the same inputs, interleaved, with
    torch's thread count for both."""
    threads = torch.get_num_threads()
    sess = session(path, threads)
    x = sample_inputs(names, batch, seq, model.config.vocab_size, seed=7, pad=False)
    feed = {n: x[n].numpy() for n in names}
    kw = {"use_cache": False} if causal else {}
    torch_t, ort_t = [], []
    with torch.inference_mode():
        model(**x, **kw)
        sess.run(["logits"], feed)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**x, **kw)
            torch_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sess.run(["logits"], feed)
            ort_t.append(time.perf_counter() - t0)
    t, o = float(np.median(torch_t)) * 1000, float(np.median(ort_t)) * 1000
    return {"batch_size": batch, "seq_len": seq, "threads": threads, "repeats": repeats, "torch_ms": round(t, 3),
            "onnxruntime_ms": round(o, 3), "speedup": round(t / o, 3) if o else None}
