"""Named architectures: from a `model` config (conf/model/*.yaml) to a transformers config.

Named architectures live in conf/model as YAML; this module only knows how each family maps to a
transformers config class and which task it pretrains with. Models are always transformers
models, so `save_pretrained` output loads anywhere with no bigml code. Reading model directories
is bigml.models.loading's.
"""

from __future__ import annotations

import logging

import torch
from transformers import BertConfig, GPT2Config, LlamaConfig, PretrainedConfig

from bigml.errors import ConfigError
from bigml.models.classic import BigmlDCGANConfig, BigmlRNNConfig

log = logging.getLogger(__name__)

# arch -> (transformers config class, the task it pretrains with: a bigml.tasks name)
ARCHS: dict[str, tuple[type[PretrainedConfig], str]] = {
    "bert": (BertConfig, "masked_lm"),
    "gpt2": (GPT2Config, "causal_lm"),
    "llama": (LlamaConfig, "causal_lm"),
    "rnn": (BigmlRNNConfig, "causal_lm"),          # model=lstm | gru (bigml.models.classic)
    "dcgan": (BigmlDCGANConfig, "image-generation"),  # model=dcgan: trained by bigml.adversarial
}
# Keys of conf/model/*.yaml that are bigml's, not transformers' (the friendly names feed the
# transformers fields through interpolation in conf/arch/*.yaml).
BIGML_KEYS = {"name", "arch", "path", "num_layers", "num_heads", "num_kv_heads", "dropout", "hidden_size",
              "intermediate_size", "max_position_embeddings", "inputs", "training", "gan", "objective"}


def arch_of(model_cfg) -> str:
    arch = str(model_cfg.get("arch"))
    if arch not in ARCHS:
        raise ConfigError("model.arch", f"unknown architecture {arch!r}", f"choose one of {', '.join(ARCHS)}")
    return arch


def pretraining_task_name(model_cfg) -> str:
    """The task a named architecture pretrains with (causal_lm, masked_lm)."""
    return ARCHS[arch_of(model_cfg)][1]


def hf_config_from_cfg(model_cfg, vocab_size: int, special_ids: dict[str, int | None]) -> PretrainedConfig:
    """Build the transformers config for a named from-scratch architecture."""
    cls, _ = ARCHS[arch_of(model_cfg)]
    known = set(cls().to_dict())
    fields = {}
    for k, v in model_cfg.items():
        if k in BIGML_KEYS and k not in known:
            continue
        if k not in known:
            raise ConfigError(f"model.{k}", f"not a field of transformers' {cls.__name__}",
                              "remove it, or use one of the fields listed by `bigml pretrain --cfg job`")
        fields[k] = v
    if "num_heads" in model_cfg and (int(model_cfg.num_heads) <= 0 or int(model_cfg.hidden_size) % int(model_cfg.num_heads)):
        raise ConfigError("model.num_heads", f"{model_cfg.num_heads} does not divide hidden_size {model_cfg.hidden_size}")
    fields.update({k: v for k, v in special_ids.items() if v is not None})
    fields["vocab_size"] = vocab_size
    return cls(**fields)


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(config: PretrainedConfig) -> str:
    d = config.to_dict()
    layers = d.get("num_hidden_layers", d.get("n_layer", d.get("num_layers")))
    hidden = d.get("hidden_size", d.get("n_embd"))
    return f"{config.model_type} {layers}x{hidden}, vocab {config.vocab_size}"
