"""What a finetuning run reads: text, images or a table of numbers, from the model and the data.

    input_kind(cfg) -> "text" | "image" | "tabular"

The model decides first: a model directory by its config (bigml's image and tabular architectures,
any *ForImageClassification), a named preset by its `inputs` key (mlp, which is both the MNIST MLP
and a dense network over table columns, says `auto`: images when the data holds images, else a
table). Text models (the default) read text. A model and data that do not fit are refused here,
before anything is read.
"""

from __future__ import annotations

from pathlib import Path

from bigml.errors import ConfigError

KINDS = ("text", "image", "tabular")


def _directory_kind(path: str) -> str:
    from transformers import AutoConfig

    from bigml.models import classic

    p = Path(str(path)).expanduser()
    if not (p / "config.json").is_file():
        return "text"  # not a local model directory: the loader says what is wrong
    try:
        config = AutoConfig.from_pretrained(str(p))
    except Exception:
        return "text"
    if config.model_type == classic.BigmlTabularConfig.model_type:
        return "tabular"
    if config.model_type == classic.BigmlDCGANConfig.model_type:
        return "generator"
    archs = list(getattr(config, "architectures", None) or [])
    if (archs and archs[0].endswith("ForImageClassification")) or config.model_type in (
            classic.BigmlImageMLPConfig.model_type, classic.BigmlCNNConfig.model_type):
        return "image"
    return "text"


def data_holds_images(data_cfg) -> bool:
    from bigml.data.images import holds_images

    if data_cfg.get("kind") == "images":
        return True
    return bool(data_cfg.get("path")) and holds_images(data_cfg.path)


def model_inputs(cfg) -> str:
    """text | image | tabular | auto, as the model says."""
    if cfg.model.get("path"):
        return _directory_kind(str(cfg.model.path))
    return str(cfg.model.get("inputs") or "text")


def input_kind(cfg) -> str:
    model = model_inputs(cfg)
    images = data_holds_images(cfg.data)
    name = cfg.model.get("path") or f"model={cfg.model.get('name')}"
    data = f"data.path={cfg.data.path}" if cfg.data.get("path") else f"data={cfg.data.get('name')}"
    if model == "generator":
        raise ConfigError("model.path", f"{name} is a GAN generator: it draws images and has no head to finetune",
                          "bigml generate model.path=... num_images=64 output=grid.png, or bigml eval for its FID")
    if model == "auto":
        return "image" if images else "tabular"
    if model == "image" and not images:
        raise ConfigError("data", f"{name} classifies images, but {data} holds no images",
                          "use data=digits | data=fashion-mnist, or data.path=<folder per class of .png/.jpg>")
    if model != "image" and images:
        raise ConfigError("model", f"{data} holds images, but {name} reads {model}",
                          "use model=mlp | model=cnn | model=vit-tiny (or a model.path of an image classifier)")
    if model not in KINDS:
        raise ConfigError("model.inputs", f"{model!r} is not one of {', '.join(KINDS)} or auto")
    return model
