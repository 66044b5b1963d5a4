"""Type checks for command-line values.

bigml's configs are plain YAML (readable, and any transformers or Lightning argument can be added),
so Hydra does not know that `trainer.max_steps` is an integer. Instead every value is compared with
the value the same key has in the preset defaults: a number where a number was, a boolean where a
boolean was. `trainer.max_steps=abc` fails here with one line instead of deep inside Lightning.
"""

from __future__ import annotations

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from bigml.errors import ConfigError

_KIND = {bool: "a boolean (true/false)", int: "an integer", float: "a number"}


def _reference(config_name: str) -> DictConfig:
    """The command's config with the user's group choices (model=..., data=...) and no other override."""
    choices = HydraConfig.get().runtime.choices
    overrides = [f"{g}={o}" for g, o in choices.items()
                 if o is not None and not g.startswith("hydra") and "@" not in g and "/" not in g]
    loader = GlobalHydra.instance().config_loader()
    return loader.load_configuration(config_name, overrides, run_mode=RunMode.RUN)


def _walk(user, ref, prefix: str) -> None:
    if isinstance(ref, DictConfig) and isinstance(user, DictConfig):
        for key in ref.keys():
            if key in user and not OmegaConf.is_missing(ref, key) and not OmegaConf.is_missing(user, key):
                ref_node, user_node = ref._get_node(key), user._get_node(key)
                if getattr(ref_node, "_is_interpolation", lambda: False)() or getattr(user_node, "_is_interpolation", lambda: False)():
                    continue
                _walk(user[key], ref[key], f"{prefix}{key}.")
        return
    if isinstance(ref, ListConfig) or ref is None or user is None:
        return
    key = prefix[:-1]
    expected = type(ref)
    if expected is bool and not isinstance(user, bool):
        raise ConfigError(key, f"{user!r} is not {_KIND[bool]}")
    if expected in (int, float) and (isinstance(user, bool) or not isinstance(user, (int, float))):
        raise ConfigError(key, f"{user!r} is not {_KIND[expected]}")
    if expected is int and isinstance(user, float) and not user.is_integer():
        raise ConfigError(key, f"{user!r} is not {_KIND[int]}")


def check_types(cfg: DictConfig, config_name: str) -> None:
    """Raise ConfigError naming the first key whose value has the wrong type for its default."""
    if not HydraConfig.initialized() or not HydraConfig.get().overrides.task or not GlobalHydra.instance().is_initialized():
        return
    _walk(cfg, _reference(config_name), "")
