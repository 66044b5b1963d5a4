"""Optimizers and learning-rate schedules from conf/optimizer and conf/scheduler."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from bigml.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and norm gains are left alone (as in GPT-2 / nanoGPT)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """`cfg` is an optimizer config (a `_partial_` target, see conf/optimizer) as a dict or DictConfig."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    if float(cfg["lr"]) <= 0:
        raise ConfigError("optimizer.lr", f"{cfg['lr']} must be positive")
    supports_fused = "fused" in cfg  # the presets list `fused` only for optimizers that have the option
    fused = cfg.pop("fused", None)
    kwargs = {}
    # torch's fused Adam/AdamW kernels run on CPU as well as GPU (torch >= 2.4); BENCHMARKS.md's
    # pretraining section times the three implementations side by side (scripts/bench_pretrain.py).
    devices = {p.device.type for p in model.parameters()}
    if fused or (fused is None and supports_fused and devices <= {"cuda", "cpu", "mps", "xpu"}):
        kwargs["fused"] = True
    weight_decay = float(cfg.get("weight_decay", 0.0))
    factory = instantiate(cfg)
    return factory(param_groups(model, weight_decay), **kwargs)


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, total_steps: int):
    cfg = OmegaConf.create(cfg) if not OmegaConf.is_config(cfg) else cfg
    name = str(cfg.name)
    if name not in SCHEDULES:
        raise ConfigError("scheduler.name", f"unknown schedule {name!r}", f"choose one of {', '.join(SCHEDULES)}")
    total_steps = max(int(total_steps), 1)
    warmup = cfg.get("warmup_steps")
    warmup = int(warmup) if warmup is not None else int(float(cfg.get("warmup_ratio", 0.0)) * total_steps)
    if name == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total_steps, min_lr_rate=float(cfg.get("min_lr_ratio", 0.0)))
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)
