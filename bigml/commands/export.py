"""`bigml export`: a model directory in a format other runtimes read, checked against PyTorch.

    format=onnx   model.onnx (+ config.json, the tokenizer): task models and language models;
                  onnxruntime's logits compared with PyTorch's on several shapes (tolerance
                  onnx.tolerance), and both timed at measure.batch_size x measure.seq_len
    format=gguf   model.gguf (the tokenizer inside): Llama- and GPT-2-family causal LMs, for
                  llama.cpp; read back by transformers' GGUF loader and its logits compared

The output directory is written under a temporary name and renamed when the check passed, so a
directory named by output= is always a checked export; it also holds README.md (the model card)
and export.json (the check and the timings). No run directory is kept: export writes only output=.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bigml.errors import BigmlError, ConfigError, DataError, UsageError

log = logging.getLogger("bigml")
FORMATS = ("onnx", "gguf")
GGUF_TOLERANCE = {"f32": 1e-4, "f16": 0.05, "q8_0": 0.2}


def _check(cfg: DictConfig) -> tuple[str, Path]:
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ConfigError("format", f"unknown format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    from bigml.export import gguf, onnx

    if str(cfg.onnx.exporter) not in onnx.EXPORTERS:
        raise ConfigError("onnx.exporter", f"unknown exporter {cfg.onnx.exporter!r}", f"choose one of {', '.join(onnx.EXPORTERS)}")
    if str(cfg.gguf.dtype) not in gguf.DTYPES:
        raise ConfigError("gguf.dtype", f"unknown dtype {cfg.gguf.dtype!r}", f"choose one of {', '.join(gguf.DTYPES)}")
    if int(cfg.measure.batch_size) < 1 or int(cfg.measure.seq_len) < 2 or int(cfg.measure.repeats) < 1:
        raise ConfigError("measure", "batch_size >= 1, seq_len >= 2 and repeats >= 1 are needed")
    out = Path(str(cfg.output)).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output={cfg.output}: already exists and is not empty; choose a new directory")
    if Path(str(cfg.model.path)).expanduser().resolve() in (out.resolve(), *out.resolve().parents):
        raise UsageError(f"output={cfg.output}: is inside model.path; choose a directory outside the model")
    return fmt, out


def _require(fmt: str) -> None:
    needed = {"onnx": ("onnx", "onnxruntime"), "gguf": ("gguf",)}[fmt]
    import importlib.util

    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"format={fmt} needs {', '.join(missing)}: pip install 'bigml[export]'")


def run(cfg: DictConfig) -> dict[str, Any]:
    fmt, out = _check(cfg)
    _require(fmt)
    from bigml.atomic import atomic_directory
    from bigml.compression.storage import tree_checksum
    from bigml.data.tokenizer import load_tokenizer
    from bigml.models.architectures import describe
    from bigml.models.loading import load_model, model_task, read_config

    path = str(Path(str(cfg.model.path)).expanduser())
    config = read_config(path)
    if getattr(config, "bigml_quantization", None) or getattr(config, "quantization_config", None):
        raise DataError(f"model.path={path}: a quantized model (bigml compress) cannot be exported; export the model "
                        f"it came from ({'gguf.dtype=q8_0' if fmt == 'gguf' else 'ONNX Runtime quantizes on its own'})")
    task = model_task(config, path, str(cfg.get("task") or "auto"))
    tokenizer = load_tokenizer(path, key="model.path")
    if fmt == "gguf":
        from bigml.export import gguf

        gguf.check_supported(config, tokenizer)
    elif not (task.endpoints or task.finetunable):
        raise DataError(f"format=onnx supports task models and causal / masked language models; this is {task.name}")
    checksum = tree_checksum(path)
    model, task = load_model(path, task, config=config)
    log.info("export: %s (%s, %s) -> %s as %s", path, describe(config), task.name, out, fmt)
    t0 = time.perf_counter()
    with atomic_directory(out) as tmp:
        report = _onnx(cfg, model, tokenizer, task, tmp) if fmt == "onnx" else _gguf(cfg, model, tokenizer, tmp)
        report.update({"format": fmt, "model": path, "task": task.name, "export_time_s": round(time.perf_counter() - t0, 2),
                       "size_mb": round(sum(f.stat().st_size for f in tmp.iterdir() if f.suffix in (".onnx", ".gguf", ".data")) / 1e6, 3)})
        for name in ("bigml.json",):
            if (Path(path) / name).is_file():
                shutil.copy(Path(path) / name, tmp / name)
        (tmp / "export.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        from bigml.model_card import write_card

        check = (f"onnxruntime's logits match PyTorch's within {report['parity']['max_abs_diff']:.2g}" if fmt == "onnx"
                 else f"transformers reads it back with logits within {report['parity']['max_abs_diff']:.2g} of the source's")
        write_card(tmp, export={"format": fmt, "file": report["file"], "source": path, "check": check + ".",
                                "inputs": report.get("inputs")}, location=out)
    if tree_checksum(path) != checksum:  # a bug, never a user error
        raise RuntimeError(f"model.path={path} changed while exporting")
    _print(report, out)
    return report


def _tolerance_ok(parity: dict, tolerance: float) -> bool:
    return parity["max_abs_diff"] <= tolerance * max(1.0, parity["max_abs_logit"])


def _onnx(cfg, model, tokenizer, task, tmp: Path) -> dict:
    from bigml.data.labeled import model_max_length
    from bigml.export import onnx

    causal = "completions" in task.endpoints
    try:
        names = onnx.export(model, tokenizer, tmp / "model.onnx", str(cfg.onnx.exporter), int(cfg.onnx.opset), causal=causal)
    except Exception as e:
        root = e
        while root.__cause__ is not None:  # torch's exporter wraps the reason in pages of advice
            root = root.__cause__
        raise BigmlError(f"the ONNX exporter failed ({type(root).__name__}: {str(root).splitlines()[0][:300]}); "
                         f"try onnx.exporter={'torchscript' if cfg.onnx.exporter == 'dynamo' else 'dynamo'}") from e
    model.config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    limit = model_max_length(tokenizer, model.config)
    parity = onnx.parity(model, tmp / "model.onnx", names, limit, causal)
    tolerance = float(cfg.onnx.tolerance)
    parity["tolerance"] = tolerance
    if not _tolerance_ok(parity, tolerance):
        raise BigmlError(f"onnxruntime's logits differ from PyTorch's by up to {parity['max_abs_diff']:.3g} (logits up to "
                         f"{parity['max_abs_logit']:.3g}), more than onnx.tolerance={tolerance:g}; nothing was written")
    seq = min(int(cfg.measure.seq_len), limit) if limit else int(cfg.measure.seq_len)
    lat = onnx.latency(model, tmp / "model.onnx", names, int(cfg.measure.batch_size), seq, int(cfg.measure.repeats), causal)
    return {"file": "model.onnx", "inputs": list(names), "outputs": ["logits"], "exporter": str(cfg.onnx.exporter),
            "opset": int(cfg.onnx.opset), "parity": parity, "latency": lat}


def _gguf(cfg, model, tokenizer, tmp: Path) -> dict:
    import torch

    from bigml.export import gguf, onnx

    dtype = str(cfg.gguf.dtype)
    info = gguf.export(model, tokenizer, tmp / "model.gguf", dtype, name=Path(str(cfg.model.path)).resolve().name)
    reloaded, tok2 = gguf.reload(tmp, "model.gguf")
    x = onnx.sample_inputs(("input_ids",), 2, min(48, model.config.max_position_embeddings if hasattr(model.config, "max_position_embeddings") else 48),
                           model.config.vocab_size, seed=0, pad=False)
    with torch.inference_mode():
        a, b = model(**x).logits.float(), reloaded(**x).logits.float()
    parity = {"max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max()), "shapes": [list(x["input_ids"].shape)]}
    samples = ["def main():\n    return 'héllo' + str(42)", "  two spaces\tand a tab", "The quick brown fox"]
    parity["tokenizer_identical"] = all(tokenizer(s)["input_ids"] == tok2(s)["input_ids"] for s in samples)
    tolerance = float(cfg.gguf.tolerance) if cfg.gguf.tolerance is not None else GGUF_TOLERANCE[dtype]
    parity["tolerance"] = tolerance
    if not _tolerance_ok(parity, tolerance) or not parity["tokenizer_identical"]:
        raise BigmlError(f"the GGUF file read back by transformers differs from the model (logits by up to "
                         f"{parity['max_abs_diff']:.3g}, tokenizer identical: {parity['tokenizer_identical']}); nothing was written")
    return {"file": "model.gguf", **info, "parity": parity}


def _print(report: dict, out: Path) -> None:
    from bigml.commands.runner import print_summary

    rows: dict[str, Any] = {"format": report["format"], "model": report["model"], "task": report["task"],
                            "file": str(out / report["file"]), "size (MB)": report["size_mb"],
                            "max |logit diff|": report["parity"]["max_abs_diff"], "tolerance": report["parity"]["tolerance"]}
    lat = report.get("latency")
    if lat:
        shape = f"{lat['batch_size']} x {lat['seq_len']}, {lat['threads']} threads"
        rows[f"PyTorch eager (ms, {shape})"] = lat["torch_ms"]
        rows[f"onnxruntime (ms, {shape})"] = lat["onnxruntime_ms"]
        rows["onnxruntime speed-up"] = lat["speedup"]
    if "tokenizer_identical" in report["parity"]:
        rows["tokenizer identical"] = report["parity"]["tokenizer_identical"]
    rows["export time (s)"] = report["export_time_s"]
    print_summary("bigml export", rows)
