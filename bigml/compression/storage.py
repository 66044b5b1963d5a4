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

from bigml.compression.quantize import HISTORY_KEY, INT_SCHEMES, QUANT_KEY  # noqa: F401 - re-exported
from bigml.models.loading import load_model as _load
from bigml.models.loading import read_config, require_weights

log = logging.getLogger("bigml")


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
    config = read_config(str(path), key)
    require_weights(str(path), key)
    return config


def load_model(path: str, key: str = "model.path"):
    """(model in eval mode, task) from any HF directory, bigml-quantized ones included."""
    return _load(path, key=key)


def save_model(model: torch.nn.Module, tokenizer, out: Path, metadata: dict[str, Any],
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """save_pretrained (safetensors) + tokenizer + bigml.json into `out` (a fresh directory)."""
    from bigml import __version__

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    (out / "bigml.json").write_text(json.dumps({**metadata, "bigml_version": __version__}, indent=2, default=str))
    from bigml.model_card import write_card

    write_card(out)
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
