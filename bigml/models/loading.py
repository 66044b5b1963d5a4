"""Reading a model directory: the one loader every command uses.

    read_config(path, key)          the transformers config (DataError: no directory, no config.json)
    require_weights(path, key)      the one "no weights" error
    metadata(path)                  bigml.json: what bigml recorded (command, task, labels, ...)
    model_task(config, path, name)  the task named (task=...), else the one the directory describes
    load_model(path, task, ...)     -> (model in eval mode, task): plain Hugging Face weights (LoRA
                                    adapters are merged before bigml saves; torchao-quantized ones
                                    through transformers' TorchAoConfig), or weights in bigml's
                                    quantized format rebuilt from their integers
    build_model(config, task)       a randomly initialized model (transformers' own initialization)

A `path` is a local directory or, where the network allows, a hub id. Python code shipped with a
model (`auto_map` in config.json) never runs: trust_remote_code is never passed, so such a model
is refused with one line. Directories bigml wrote carry SHA256SUMS, checked before use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from bigml.atomic import check_intact
from bigml.errors import DataError
from bigml.models import classic  # noqa: F401 - registers bigml's own architectures with the Auto classes
from bigml.tasks import Task, get_task, infer_task


def read_config(path: str, key: str = "model.path") -> PretrainedConfig:
    p = Path(str(path)).expanduser()
    path = str(path)
    if p.exists() and not (p / "config.json").exists():
        raise DataError(f"{key}={path}: no config.json there; point it at a Hugging Face model directory "
                        f"(a bigml run's model/ folder)")
    if not p.exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise DataError(f"{key}={path}: no such directory")
    if p.is_dir():
        check_intact(p, key)
    try:
        return AutoConfig.from_pretrained(str(p) if p.exists() else path)
    except Exception as e:
        raise DataError(f"{key}={path}: could not read the model config ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def require_weights(path: str, key: str = "model.path") -> None:
    p = Path(str(path)).expanduser()
    if not p.exists():
        return  # a hub id: from_pretrained will say
    if not (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")) or (p / "model.safetensors.index.json").exists()):
        raise DataError(f"{key}={path}: no weights (model.safetensors / pytorch_model.bin) in the directory")


def metadata(path: str | Path) -> dict:
    f = Path(str(path)).expanduser() / "bigml.json"
    try:
        return json.loads(f.read_text()) if f.exists() else {}
    except ValueError:
        return {}


def quantization_of(config) -> dict | None:
    from bigml.compression.quantize import QUANT_KEY

    return getattr(config, QUANT_KEY, None)


def model_task(config, path: str | None = None, name: str | None = None) -> Task:
    """`name` (a task= choice other than auto), else what bigml.json records, else the head's task."""
    if name not in (None, "auto"):
        return get_task(name)
    return infer_task(config, metadata(path) if path else None)


def load_model(path: str, task: Task | str | None = None, *, key: str = "model.path", config=None,
               head_kwargs: dict | None = None, dtype: torch.dtype = torch.float32):
    """(model in eval mode, task). `head_kwargs` (num_labels, id2label, ...) give a new task head:
    weights of mismatched size are then initialized, not refused."""
    config = config if config is not None else read_config(path, key)
    require_weights(path, key)
    task = model_task(config, path, task.name if isinstance(task, Task) else task)
    where = str(Path(str(path)).expanduser()) if Path(str(path)).expanduser().exists() else str(path)
    quant = quantization_of(config)
    try:
        if quant and quant.get("scheme") in _int_schemes() and quant.get("format", "bigml") == "bigml":
            from bigml.compression.quantize import materialize, read_tensors

            model = task.auto_class.from_config(config, dtype=torch.float32)
            materialize(model, read_tensors(where, key), quant)
        else:
            kw = dict(head_kwargs or {})
            if kw:
                kw["ignore_mismatched_sizes"] = True
            # a bf16/fp16 export of bigml compress stays in its dtype (that is its point)
            model = task.auto_class.from_pretrained(where, dtype="auto" if quant else dtype, **kw)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{key}={path}: could not load it as a {task.name} model "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    model.eval()
    return model, task


def _int_schemes() -> tuple[str, ...]:
    from bigml.compression.quantize import INT_SCHEMES

    return INT_SCHEMES


def build_model(config: PretrainedConfig, task: Task | str):
    return get_task(task).auto_class.from_config(config, dtype=torch.float32)
