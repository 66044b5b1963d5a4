"""Model presets that bring their own training defaults (conf/model/*.yaml, the `training:` block).

A convnet wants a learning rate of 1e-3 and a few dozen epochs where a pretrained transformer wants
5e-5 and three, so presets such as model=mlp / cnn / linear / lstm carry
`training: {optimizer: {lr: ...}, trainer: {max_epochs: ...}, data: {batch_size: ...}}`. They are
applied over the command's own defaults, except for keys set on the command line, which always win.
(Hydra's defaults list cannot express this: finetune.yaml's own values are composed after the model
group, and data presets after it too.)
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("bigml")


def _flatten(node, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def command_line_keys() -> set[str]:
    """Keys the user set (key=value, +key=value, ++key=value) in this Hydra job."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # not in a Hydra job (a library call): nothing was set by hand
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def apply_training_defaults(cfg: DictConfig) -> dict[str, object]:
    """Apply cfg.model.training to cfg (in place) where the command line did not set the key; returns
    what was applied."""
    block = cfg.model.get("training") if cfg.get("model") is not None else None
    if not block:
        return {}
    given = command_line_keys()
    applied = {}
    for key, value in _flatten(OmegaConf.to_container(block, resolve=True)).items():
        if key in given or OmegaConf.select(cfg, key.rsplit(".", 1)[0]) is None:
            continue
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False)
        applied[key] = value
    if applied:
        log.info("model=%s training defaults: %s", cfg.model.get("name"),
                 ", ".join(f"{k}={v}" for k, v in applied.items()))
    return applied


# -- configs of bigml's own architectures (bigml.models.classic) and ViT --------------------------

def _model_name(model_cfg) -> str:
    return f"model={model_cfg.get('name') or model_cfg.get('arch')}"


def image_config(model_cfg, channels: int, size: tuple[int, int], head: dict):
    """The transformers config of an image classifier preset (mlp, cnn, vit) for images of `size`
    with `channels`, plus the head arguments (labels)."""
    from bigml.errors import ConfigError
    from bigml.models import classic

    arch = str(model_cfg.get("arch"))
    if arch == "mlp":
        return classic.BigmlImageMLPConfig(num_channels=channels, image_size=list(size),
                                           hidden_sizes=list(model_cfg.get("hidden_sizes") or []),
                                           dropout=float(model_cfg.get("dropout") or 0.0), **head)
    if arch == "cnn":
        return classic.BigmlCNNConfig(num_channels=channels, image_size=list(size),
                                      channels=list(model_cfg.get("channels") or [32, 64]),
                                      hidden_size=int(model_cfg.get("hidden_size") or 128),
                                      dropout=float(model_cfg.get("dropout") or 0.0), **head)
    if arch == "vit":
        from transformers import ViTConfig

        patch = int(model_cfg.get("patch_size") or (4 if min(size) >= 16 else 2))
        if size[0] % patch or size[1] % patch:
            raise ConfigError("model.patch_size", f"{patch} does not divide the image size {size[0]}x{size[1]}",
                              "set model.patch_size, or data.image_size to a multiple of it")
        hidden, heads = int(model_cfg.hidden_size), int(model_cfg.num_heads)
        if hidden % heads:
            raise ConfigError("model.num_heads", f"{heads} does not divide hidden_size {hidden}")
        # 3 channels: transformers' image-classification pipeline feeds every image as RGB
        return ViTConfig(image_size=list(size), patch_size=patch, num_channels=3, hidden_size=hidden,
                         num_hidden_layers=int(model_cfg.num_layers), num_attention_heads=heads,
                         intermediate_size=int(model_cfg.intermediate_size),
                         hidden_dropout_prob=float(model_cfg.get("dropout") or 0.0),
                         attention_probs_dropout_prob=float(model_cfg.get("dropout") or 0.0), **head)
    raise ConfigError("model", f"{_model_name(model_cfg)} is not an image classifier",
                      "use model=mlp | model=cnn | model=vit-tiny")


def tabular_config(model_cfg, feature_names: list[str], label_column: str, head: dict, stats: dict):
    """The config of a tabular preset (linear, mlp): the feature standardization `stats` (feature_mean,
    feature_std, target_mean, target_std) seeds the model's buffers."""
    from bigml.errors import ConfigError
    from bigml.models import classic

    arch = str(model_cfg.get("arch"))
    if arch not in ("linear", "mlp"):
        raise ConfigError("model", f"{_model_name(model_cfg)} does not read tables of numbers",
                          "use model=linear | model=mlp")
    hidden = [] if arch == "linear" else list(model_cfg.get("hidden_sizes") or [])
    return classic.BigmlTabularConfig(num_features=len(feature_names), hidden_sizes=hidden,
                                      dropout=float(model_cfg.get("dropout") or 0.0), feature_names=feature_names,
                                      label_column=label_column, **stats, **head)
