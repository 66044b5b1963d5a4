"""Loading model directories for compression, and saving compressed ones.

Pruned, distilled and bf16/fp16 models are ordinary transformers models: `save_pretrained` output
that plain `AutoModel*.from_pretrained` loads. Integer-quantized models are not: transformers has no
serialization for torch.ao's packed int8 Linear, and its torchao integration ties the file format to
torchao's tensor subclasses. bigml stores them as

    model.safetensors   every tensor of the model, except that the weight of each quantized Linear
                        `name` is replaced by `name.qweight` (int8; int4 packed two per byte),
                        `name.scales` (fp32) and, for torch.ao, `name.zero_points`
    config.json         the transformers config plus `bigml_quantization` (scheme, backend, the
                        quantized module names, parameter count)

and `load_model` rebuilds the quantized modules from those integers (no calibration, no
re-quantization drift: compress measures the model reloaded from disk, so what it reports is what
`bigml eval` gets).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bigml.errors import DataError
from bigml.models import architectures

log = logging.getLogger("bigml")

QUANT_KEY = "bigml_quantization"  # in config.json: how the weights are quantized
HISTORY_KEY = "bigml_compression"  # in config.json: the compression stages this model went through
INT_SCHEMES = ("int8-dynamic", "int8-weight-only", "int4-weight-only")

def quantization_of(path: str | Path) -> dict | None:
    """The `bigml_quantization` entry of a model directory's config.json, if any."""
    f = Path(path).expanduser() / "config.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text()).get(QUANT_KEY)
    except ValueError:
        return None


def check_model_dir(path: str, key: str = "model.path"):
    """The config of a model directory that holds weights; DataError (exit 2) otherwise."""
    config = architectures.read_config(str(path), key)
    if not architectures.has_weights(str(path)):
        raise DataError(f"{key}={path}: no weights (model.safetensors / pytorch_model.bin) in the directory")
    return config


def load_model(path: str, key: str = "model.path") -> tuple[torch.nn.Module, str]:
    """(model in eval mode, kind) from any HF directory, bigml-quantized ones included. `kind` is
    bigml.evaluation's (classification, regression, token, causal_lm, masked_lm, ...)."""
    from bigml.evaluation import infer_kind

    config = check_model_dir(path, key)
    kind = infer_kind(config)
    return load_weights(str(Path(path).expanduser()), config, kind, key), kind


def load_weights(path: str, config, kind: str, key: str = "model.path") -> torch.nn.Module:
    """The model of a directory whose config is read: plain HF weights (fp32, or the saved bf16/fp16
    of a cast), or bigml's int8/int4 format rebuilt by `quantize.materialize`."""
    from bigml.evaluation import auto_class

    cls = auto_class(kind)
    quant = getattr(config, QUANT_KEY, None)
    try:
        if quant and quant.get("scheme") in INT_SCHEMES:
            model = load_quantized(path, config, cls, quant)
        else:
            # a bf16/fp16 export stays bf16/fp16 (that is its point); everything else loads in fp32
            model = cls.from_pretrained(path, dtype="auto" if quant else torch.float32)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{key}={path}: could not load weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    model.eval()
    return model


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise DataError(f"model.path={path}: a bigml-quantized model needs its model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def load_quantized(path: str, config, cls, quant: dict) -> torch.nn.Module:
    from bigml.compression import quantize

    model = cls.from_config(config, dtype=torch.float32)
    tensors = _read_tensors(path)
    quantize.materialize(model, tensors, quant)
    return model


def save_model(model: torch.nn.Module, tokenizer, out: Path, metadata: dict[str, Any],
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """save_pretrained (safetensors) + tokenizer + bigml.json into `out` (a fresh directory)."""
    from bigml import __version__

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    (out / "bigml.json").write_text(json.dumps({**metadata, "bigml_version": __version__}, indent=2, default=str))
    return out


def weight_bytes(path: str | Path) -> int:
    """Bytes of the weight files of a model directory (what `size_mb` reports)."""
    p = Path(path).expanduser()
    files = [*p.glob("*.safetensors"), *p.glob("pytorch_model*.bin")]
    return sum(f.stat().st_size for f in files)


def tree_checksum(path: str | Path) -> str:
    """sha256 over every file of a directory (names and contents): proves an input was not modified."""
    import hashlib

    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
