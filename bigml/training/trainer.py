"""The Lightning Trainer every training command uses, built from conf/trainer + conf/logger."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.utilities import GradClipAlgorithmType

from bigml import hardware
from bigml.callbacks.progress import LogLines
from bigml.callbacks.throughput import ThroughputMeter
from bigml.errors import ConfigError, UsageError
from bigml.models.fast_dropout import use_hash_dropout
from bigml.progress import interactive
from bigml.run_dir import check_path_component
from bigml.training.checkpoints import AtomicCheckpointIO
from bigml.training.distributed import ddp_strategy
from bigml.training.nonfinite import NonFiniteGuard
from bigml.training.preemption import PreemptionCheckpoint

log = logging.getLogger("bigml")
# keys of conf/trainer that are bigml's, not Trainer arguments
BIGML_TRAINER_KEYS = ("compile", "fsdp", "gradient_checkpointing", "on_nonfinite", "max_rollbacks", "rollback_lr_factor",
                      "max_skipped", "ddp_timeout_s", "dropout_masks")
DROPOUT_MASKS = ("auto", "hash", "torch")


def trainer_kwargs(cfg) -> tuple[dict, dict]:
    """(Trainer arguments, bigml's own trainer keys) with precision resolved."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    extra = {k: kwargs.pop(k) for k in BIGML_TRAINER_KEYS if k in kwargs}
    if str(kwargs.get("precision")) not in hardware.PRECISIONS and not str(kwargs.get("precision")).isdigit():
        raise ConfigError("trainer.precision", f"unknown precision {kwargs.get('precision')!r}",
                          f"choose one of {', '.join(hardware.PRECISIONS)}")
    requested = str(kwargs["precision"])
    kwargs["precision"] = hardware.resolve_precision(requested, str(kwargs.get("accelerator", "auto")))
    # what a hardware-dependent default resolved to, and why: metrics.json "decisions"
    extra["decisions"] = {
        "precision": hardware.precision_reason(requested, str(kwargs.get("accelerator", "auto")), kwargs["precision"]),
        "compile": "on (trainer.compile=true)" if extra.get("compile") else "off (trainer.compile=false: the default on CPU)",
    }
    masks = str(extra.get("dropout_masks") or "auto")
    if masks not in DROPOUT_MASKS:
        raise ConfigError("trainer.dropout_masks", f"unknown value {masks!r}", f"choose one of {', '.join(DROPOUT_MASKS)}")
    on_cpu = _autocast_device(str(kwargs.get("accelerator", "auto"))) == "cpu"
    # auto: hash masks on CPU, where torch draws them serially; torch's under torch.compile (inductor
    # generates its own parallel masks) and on GPUs (parallel Philox)
    extra["hash_dropout"] = masks == "hash" or (masks == "auto" and on_cpu and not extra.get("compile"))
    if masks != "auto":
        reason = f"trainer.dropout_masks={masks}"
    elif extra.get("compile"):
        reason = "auto: torch.compile generates its own masks"
    else:
        reason = "auto: on CPU torch draws dropout masks serially" if on_cpu else "auto: on GPU torch draws them in parallel"
    extra["decisions"]["dropout_masks"] = f"{'hash' if extra['hash_dropout'] else 'torch'} ({reason})"
    overfit = kwargs.pop("overfit_batches", 0) or 0
    if overfit:
        # debug=overfit: bigml's loaders serve the same first batches every epoch themselves
        # (overfit_batches(cfg)); Lightning's own switch only works on plain DataLoaders
        kwargs["limit_train_batches"] = int(overfit)
    if kwargs.get("strategy") == "fsdp" and not torch.cuda.is_available():
        raise UsageError("trainer=fsdp needs CUDA GPUs (Lightning's FSDP has no CPU path); on CPU use trainer=ddp")
    if kwargs.get("max_epochs") is None and kwargs.get("max_steps", -1) in (-1, None):
        raise ConfigError("trainer.max_steps", "neither max_steps nor max_epochs is set", "set one of them")
    return kwargs, extra


def compile_model(model) -> None:
    """trainer.compile=true: torch.compile the model's forward (Module.compile keeps parameter names,
    so checkpoints and exported weights are unchanged). Once per model; a model that trains through
    its parts (a GAN's LightningModule) is not compiled, and the log says so."""
    if model is None or isinstance(model, pl.LightningModule):
        log.warning("trainer.compile=true: this training loop calls its networks directly; they run eager")
        return
    if getattr(model, "_compiled_call_impl", None) is None:
        model.compile()
        log.info("torch.compile: the model's forward is compiled at its first steps (slower first steps)")


def overfit_batches(cfg) -> int:
    """trainer.overfit_batches (debug=overfit): train on the same first N batches, unshuffled."""
    return int(cfg.trainer.get("overfit_batches") or 0)


def build_logger(cfg):
    if cfg.get("logger") is None or cfg.logger.get("_target_") is None:
        return False
    for key in ("name", "version"):  # directories inside the run: never a way out of it
        if cfg.logger.get(key) not in (None, ""):
            check_path_component(f"logger.{key}", cfg.logger.get(key))
    try:
        return instantiate(cfg.logger)
    except Exception as e:  # the logger's package is missing, typically
        cause = e.__cause__ or e
        name = getattr(cfg, "logger", {}).get("_target_", "?").rsplit(".", 1)[-1]
        if isinstance(cause, (ImportError, ModuleNotFoundError)) or "install" in str(cause).lower():
            pkg = {"TensorBoardLogger": "tensorboard", "MLFlowLogger": "mlflow", "WandbLogger": "wandb"}.get(name, "it")
            raise UsageError(f"logger: {name} needs a package that is not installed; pip install {pkg}") from None
        raise


def enable_gradient_checkpointing(model) -> None:
    """trainer.gradient_checkpointing=true: recompute each block's activations in the backward pass
    (transformers' gradient checkpointing; less memory, about a third more compute)."""
    if model is None or not getattr(model, "supports_gradient_checkpointing", False) and \
            not hasattr(getattr(model, "base_model", None), "gradient_checkpointing_enable"):
        raise UsageError(f"trainer.gradient_checkpointing: {type(model).__name__} does not support it")
    # non-reentrant checkpointing: works with frozen inputs (LoRA) and without use_cache juggling
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def configured_callbacks(cfg, logger) -> list[pl.Callback]:
    """The `callbacks` group (conf/callbacks/): each entry instantiated from its `_target_`."""
    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or node.get("_target_") is None:
            continue
        if node["_target_"].endswith("LearningRateMonitor") and not logger:
            continue  # it writes into the logger; with logger=none there is none
        try:
            out.append(instantiate(node))
        except Exception as e:
            cause = e.__cause__ or e
            raise UsageError(f"callbacks.{name}: cannot build {node['_target_']} "
                             f"({type(cause).__name__}: {str(cause).splitlines()[0][:160]})") from None
    return out


def block_classes(model) -> set[type]:
    """The transformer block classes of a transformers model (its `_no_split_modules`): the unit
    FSDP shards and activation checkpointing recomputes."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def fsdp_strategy(model, options: dict):
    """Lightning's FSDPStrategy with one FSDP unit per transformer block."""

    blocks = block_classes(model)
    if not blocks:
        raise UsageError(f"trainer=fsdp: cannot find the transformer block class of {type(model).__name__} to shard")
    return FSDPStrategy(
        auto_wrap_policy=blocks,
        activation_checkpointing_policy=blocks if options.get("activation_checkpointing", True) else None,
        sharding_strategy=str(options.get("sharding_strategy", "FULL_SHARD")),
        state_dict_type=str(options.get("state_dict_type", "sharded")),
        cpu_offload=bool(options.get("cpu_offload", False)),
    )


def full_state_dict(trainer: pl.Trainer) -> dict | None:
    """Under FSDP, the whole model's weights gathered on CPU (a collective: call on every rank),
    keyed like the LightningModule's state dict; None for other strategies (weights are local)."""

    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(trainer.strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class Bf16Mixed(MixedPrecision):
    """bf16 autocast that lets fused optimizers clip gradients.

    Lightning's MixedPrecision refuses gradient clipping whenever the optimizer is fused, because
    with fp16's GradScaler a fused optimizer unscales inside `step()`, after clipping would have
    seen scaled gradients. bf16 has no scaler: the gradients are true gradients and clipping them
    is correct, so the check is skipped here (fp16 keeps Lightning's behaviour).
    """

    def __init__(self, device: str):
        super().__init__("bf16-mixed", device)

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM) -> None:
        Precision.clip_gradients(self, optimizer, clip_val=clip_val, gradient_clip_algorithm=gradient_clip_algorithm)


def _is_fsdp(strategy) -> bool:
    return strategy == "fsdp" or isinstance(strategy, FSDPStrategy)


def _autocast_device(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def nonfinite_guard(cfg, run_dir: Path) -> NonFiniteGuard:
    """trainer.on_nonfinite and its settings (bigml.training.nonfinite)."""
    t = cfg.trainer
    return NonFiniteGuard(str(t.get("on_nonfinite") or "stop"), max_rollbacks=int(t.get("max_rollbacks", 3)),
                          lr_factor=float(t.get("rollback_lr_factor", 0.5)), max_skipped=int(t.get("max_skipped", 100)),
                          checkpoint_dir=run_dir / "checkpoints")


def build_trainer(cfg, run_dir: Path, *, callbacks: list[pl.Callback], flops_per_token: float | None,
                  monitor_progress: bool = True, model=None,
                  guard: NonFiniteGuard | None = None) -> tuple[pl.Trainer, ThroughputMeter]:
    """The Trainer, with bigml's fault handling always on: a NaN/inf policy (`guard`, one per run:
    pass the previous trainer's after a rollback) and preemption (SIGTERM/SIGUSR1 -> checkpoint)."""
    kwargs, extra = trainer_kwargs(cfg)
    if extra.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model)
    if extra.get("hash_dropout") and model is not None:
        use_hash_dropout(model)  # before compile: the compiled forward traces the swapped layers
    if extra.get("compile"):
        compile_model(model)
    if kwargs.get("strategy") == "ddp" and extra.get("ddp_timeout_s"):
        kwargs["strategy"] = ddp_strategy(extra["ddp_timeout_s"])  # a dead or hung peer ends the wait
    if kwargs.get("strategy") == "fsdp":
        if model is None:
            raise UsageError("trainer=fsdp: this command does not support FSDP; use trainer=ddp")
        kwargs["strategy"] = fsdp_strategy(model, dict(extra.get("fsdp") or {}))
    peak = None
    if flops_per_token:
        peak = hardware.peak_flops(str(kwargs.get("accelerator", "auto")), kwargs["precision"], cfg.get("cache_dir"))
    meter = ThroughputMeter(flops_per_token, peak, log_every_n_steps=int(kwargs.get("log_every_n_steps", 10)))
    progress: list[pl.Callback] = []
    if monitor_progress:
        progress = [RichProgressBar(leave=True)] if interactive() else [LogLines(kwargs.get("log_every_n_steps", 10))]
    logger = build_logger(cfg)
    guard = guard or nonfinite_guard(cfg, run_dir)
    preemption = PreemptionCheckpoint(run_dir / "checkpoints" / "last.ckpt")
    all_callbacks = [*callbacks, guard, preemption, meter, *progress, *configured_callbacks(cfg, logger)]
    kwargs.setdefault("check_val_every_n_epoch", None)  # validate every val_check_interval steps, across epochs
    plugins: list = [AtomicCheckpointIO()]
    if kwargs.get("precision") == "bf16-mixed" and not _is_fsdp(kwargs.get("strategy")):
        plugins.append(Bf16Mixed(_autocast_device(str(kwargs.get("accelerator", "auto")))))
        del kwargs["precision"]
    try:
        trainer = pl.Trainer(
            **kwargs,
            default_root_dir=str(run_dir),
            logger=logger,
            callbacks=all_callbacks,
            enable_progress_bar=bool(progress) and interactive(),
            enable_model_summary=False,
            use_distributed_sampler=False,  # bigml's samplers shard by rank themselves (and can resume)
            plugins=plugins,
            # no_grad rather than inference_mode: metric states made in one validation must be
            # updatable in the next (trainer.validate before fit, then validation inside fit)
            inference_mode=False,
        )
    except (ValueError, TypeError) as e:  # Lightning's own argument checks
        raise UsageError(f"trainer: {str(e).splitlines()[0]}") from None
    except Exception as e:
        if type(e).__name__ == "MisconfigurationException":
            raise UsageError(f"trainer: {str(e).splitlines()[0]}") from None
        raise
    return trainer, meter


def replicas_identical(trainer: pl.Trainer, model) -> bool | None:
    """Under DDP, whether every process ended with the same weights (a cheap fingerprint per
    parameter, all-gathered). None with a single process, or when weights are sharded (FSDP)."""

    if trainer.world_size <= 1 or isinstance(trainer.strategy, FSDPStrategy):
        return None
    with torch.no_grad():
        fp = torch.stack([p.detach().double().sum() + p.detach().double().square().sum() for p in model.parameters()])
    gathered = trainer.strategy.all_gather(fp.to(trainer.strategy.root_device))
    return bool(all(torch.equal(gathered[0], g) for g in gathered[1:]))
