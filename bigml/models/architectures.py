"""From a `model` config (conf/model/*.yaml) to a transformers model, and back from a directory.

Named architectures live in conf/model as YAML; this module only knows how each family maps to a
transformers config class and which objective it trains with. Models are always transformers
models, so `save_pretrained` output loads anywhere with no bigml code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from bigml.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# arch -> (transformers config class, pretraining objective)
ARCHS: dict[str, tuple[type[PretrainedConfig], str]] = {
    "bert": (BertConfig, "masked"),
    "gpt2": (GPT2Config, "causal"),
    "llama": (LlamaConfig, "causal"),
}
# Keys of conf/model/*.yaml that are bigml's, not transformers' (the friendly names feed the
# transformers fields through interpolation in conf/arch/*.yaml).
BIGML_KEYS = {"name", "arch", "path", "num_layers", "num_heads", "num_kv_heads", "dropout", "hidden_size",
              "intermediate_size", "max_position_embeddings"}


def hf_config_from_cfg(model_cfg, vocab_size: int, special_ids: dict[str, int | None]) -> PretrainedConfig:
    """Build the transformers config for a named from-scratch architecture."""
    arch = str(model_cfg.arch)
    if arch not in ARCHS:
        raise ConfigError("model.arch", f"unknown architecture {arch!r}", f"choose one of {', '.join(ARCHS)}")
    cls, _ = ARCHS[arch]
    known = set(cls().to_dict())
    fields = {}
    for k, v in model_cfg.items():
        if k in BIGML_KEYS and k not in known:
            continue
        if k not in known:
            raise ConfigError(f"model.{k}", f"not a field of transformers' {cls.__name__}",
                              "remove it, or use one of the fields listed by `bigml pretrain --cfg job`")
        fields[k] = v
    if int(model_cfg.num_heads) <= 0 or int(model_cfg.hidden_size) % int(model_cfg.num_heads):
        raise ConfigError("model.num_heads", f"{model_cfg.num_heads} does not divide hidden_size {model_cfg.hidden_size}")
    fields.update({k: v for k, v in special_ids.items() if v is not None})
    fields["vocab_size"] = vocab_size
    return cls(**fields)


def objective_of(config: PretrainedConfig) -> str:
    """'masked' for encoders with an MLM head family, 'causal' for decoders."""
    mt = config.model_type
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "masked"
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise DataError(f"model.path: a {mt!r} model is neither a masked nor a causal language model")


def read_config(path: str, key: str = "model.path") -> PretrainedConfig:
    p = Path(path).expanduser()
    if p.exists() and not (p / "config.json").exists():
        raise DataError(f"{key}={path}: no config.json there; point it at a Hugging Face model directory "
                        f"(a bigml run's model/ folder)")
    if not p.exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise DataError(f"{key}={path}: no such directory")
    try:
        return AutoConfig.from_pretrained(str(p) if p.exists() else path)
    except Exception as e:
        raise DataError(f"{key}={path}: could not read the model config ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def has_weights(path: str) -> bool:
    p = Path(path).expanduser()
    if not p.exists():
        return True  # a hub id: from_pretrained will say
    return any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")) or (p / "model.safetensors.index.json").exists()


def load_lm(path: str, objective: str) -> PreTrainedModel:
    """Load a language model for `objective` from an HF directory (missing heads are initialized)."""
    if not has_weights(path):
        raise DataError(f"model.path={path}: no weights (model.safetensors / pytorch_model.bin) in the directory")
    from bigml.compression.storage import load_weights, quantization_of

    if quantization_of(path):  # a `bigml compress` output: int8/int4 in bigml's format, or a bf16/fp16 cast
        return load_weights(str(Path(path).expanduser()), read_config(path), "masked_lm" if objective == "masked" else "causal_lm")
    auto = AutoModelForMaskedLM if objective == "masked" else AutoModelForCausalLM
    try:
        return auto.from_pretrained(str(Path(path).expanduser()), dtype=torch.float32)
    except Exception as e:
        raise DataError(f"model.path={path}: could not load weights ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def build_lm(config: PretrainedConfig, objective: str) -> PreTrainedModel:
    """A randomly initialized language model (transformers' own initialization)."""
    auto = AutoModelForMaskedLM if objective == "masked" else AutoModelForCausalLM
    return auto.from_config(config, dtype=torch.float32)


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(config: PretrainedConfig) -> str:
    d = config.to_dict()
    layers = d.get("num_hidden_layers", d.get("n_layer"))
    hidden = d.get("hidden_size", d.get("n_embd"))
    return f"{config.model_type} {layers}x{hidden}, vocab {config.vocab_size}"


def bigml_metadata(path: Path) -> dict:
    f = Path(path) / "bigml.json"
    return json.loads(f.read_text()) if f.exists() else {}
