"""What a training run does when the loss becomes NaN or infinite: `trainer.on_nonfinite`.

    stop      (default) raise TrainingDiverged: metrics.json "status": "diverged", exit code 1;
              checkpoints/ keeps the last good state
    skip      drop the batch (no backward pass, so the optimizer step that follows changes nothing)
              and count it: metrics.json "nonfinite_skipped". The step counter and the learning-rate
              schedule still advance, so a run of max_steps trains max_steps - skipped batches.
              The run stops as diverged after trainer.max_skipped in a row
    rollback  return to the newest good checkpoint with the learning rate scaled by
              trainer.rollback_lr_factor, at most trainer.max_rollbacks times ("rollbacks")

Both LightningModules (pretraining and finetuning) call `checked_loss` on each training loss; the
policy and its counters live in the `NonFiniteGuard` callback, so there is one place for the rule.
Lightning has no such option: its `detect_anomaly` only raises, deep in autograd.

The check costs a device sync (`isfinite(...).item()`): on CPU nothing; on GPUs `stop` checks every
10th step as before (the NaN spreads to the weights, so it is still caught within 10 steps), while
`skip` and `rollback` must decide before the backward pass and check every step. Under DDP the
ranks agree (an all-reduce of the flag), so they all skip or stop together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch

from bigml.errors import ConfigError, TrainingDiverged

log = logging.getLogger("bigml")

POLICIES = ("stop", "skip", "rollback")
ROLLBACK_START = "step-000000.ckpt"  # the state before the first step, for a rollback before any checkpoint


class RollbackRequested(Exception):
    """Raised out of `trainer.fit` to return to the last good checkpoint (caught by `fit_with_rollback`)."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"non-finite loss {loss} at step {step}")
        self.step, self.loss = step, loss


class NonFiniteGuard(pl.Callback):
    def __init__(self, policy: str = "stop", max_rollbacks: int = 3, lr_factor: float = 0.5,
                 max_skipped: int = 100, checkpoint_dir: Path | None = None):
        if policy not in POLICIES:
            raise ConfigError("trainer.on_nonfinite", f"unknown policy {policy!r}", f"choose one of {', '.join(POLICIES)}")
        if not 0 < float(lr_factor) < 1:
            raise ConfigError("trainer.rollback_lr_factor", f"{lr_factor} must be between 0 and 1")
        self.policy, self.max_rollbacks, self.lr_factor = policy, int(max_rollbacks), float(lr_factor)
        self.max_skipped = int(max_skipped)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.skipped = 0
        self._skipped_in_a_row = 0
        self.rollbacks = 0
        # fault injection (tests, scripts/faults.py): a NaN loss once at each of these optimizer steps
        self._inject = {int(x) for x in os.environ.get("BIGML_FAULT_NAN_STEPS", "").split(",") if x.strip()}
        self.lr_scale = 1.0         # the learning rate relative to the configured schedule
        self._checkpoint_scale = 1.0  # ... in the checkpoint this fit started from
        self._rolling_back = False

    def summary(self) -> dict:
        out: dict = {"on_nonfinite": self.policy}
        if self.policy == "skip":
            out["nonfinite_skipped"] = self.skipped
        if self.policy == "rollback":
            out["rollbacks"] = self.rollbacks
            out["lr_scale"] = self.lr_scale
        return out

    # -- the check, called by the modules --------------------------------------------------------
    def check(self, module: pl.LightningModule, loss: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        trainer = module.trainer
        if self.policy == "stop" and loss.device.type != "cpu" and batch_idx % 10:
            return loss
        if trainer.global_step in self._inject and not trainer.sanity_checking:
            self._inject.discard(trainer.global_step)
            loss = loss.detach() + float("nan")
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            self._skipped_in_a_row = 0
            return loss
        value = float(loss.detach().float().mean()) if loss.numel() else float("nan")
        step = trainer.global_step
        if self.policy == "skip":
            self.skipped += 1
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row > self.max_skipped:
                raise TrainingDiverged(f"training diverged: {self._skipped_in_a_row} non-finite losses in a row at "
                                       f"step {step} (trainer.on_nonfinite=skip); lower optimizer.lr")
            log.warning("non-finite loss (%s) at step %d: batch skipped (%d so far)", value, step, self.skipped)
            return None  # Lightning skips the backward pass; the optimizer step finds no gradients
        if self.policy == "rollback":
            raise RollbackRequested(step, value)
        raise TrainingDiverged(
            f"training diverged at step {step} (loss {value}); lower optimizer.lr, raise scheduler.warmup_steps, "
            f"use trainer.precision=32-true, or trainer.on_nonfinite=skip|rollback; checkpoints/ holds the last good state")

    # -- rollback support ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"lr_scale": self.lr_scale, "skipped": self.skipped, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self._checkpoint_scale = float(state.get("lr_scale", 1.0))
        if not self._rolling_back:  # resume=...: carry on as the interrupted run was
            self.lr_scale = self._checkpoint_scale
            self.skipped = int(state.get("skipped", 0))
            self.rollbacks = int(state.get("rollbacks", 0))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        factor = self.lr_scale / self._checkpoint_scale
        self._checkpoint_scale, self._rolling_back = 1.0, False
        if factor != 1.0:  # after a rollback: the restored optimizer and schedule, scaled down
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] *= factor
            for config in trainer.lr_scheduler_configs:
                sched = config.scheduler
                if hasattr(sched, "base_lrs"):
                    sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        if self.policy == "rollback" and self.checkpoint_dir is not None and trainer.global_step == 0:
            start = self.checkpoint_dir / ROLLBACK_START
            if not start.exists():
                trainer.save_checkpoint(str(start), weights_only=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.checkpoint_dir is not None and trainer.is_global_zero:
            start = self.checkpoint_dir / ROLLBACK_START
            if start.exists() and (self.checkpoint_dir / "last.ckpt").exists():
                from bigml.atomic import remove_with_checksum

                remove_with_checksum(start)  # only needed until a periodic checkpoint exists

    def next_attempt(self, error: RollbackRequested) -> Path:
        """The checkpoint to return to after `error`; TrainingDiverged once the rollbacks are used up."""
        from bigml.training.checkpoints import pick_checkpoint

        self.rollbacks += 1
        if self.rollbacks > self.max_rollbacks:
            raise TrainingDiverged(f"training diverged at step {error.step} (loss {error.loss}) after "
                                   f"{self.max_rollbacks} rollbacks (trainer.max_rollbacks); lower optimizer.lr")
        ckpt = pick_checkpoint(self.checkpoint_dir.parent) if self.checkpoint_dir else None
        if ckpt is None:
            raise TrainingDiverged(f"training diverged at step {error.step} (loss {error.loss}) and there is no "
                                   f"checkpoint to roll back to")
        self.lr_scale *= self.lr_factor
        self._rolling_back = True
        log.warning("non-finite loss (%s) at step %d: rolling back to %s with the learning rate x%.3g (rollback %d of %d)",
                    error.loss, error.step, ckpt.name, self.lr_scale, self.rollbacks, self.max_rollbacks)
        return ckpt


def guard_of(trainer: pl.Trainer | None) -> NonFiniteGuard | None:
    if trainer is None:
        return None
    return next((cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)), None)


def checked_loss(module: pl.LightningModule, loss: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
    """The loss to return from training_step: itself, or None (skip the batch); raises on stop/rollback."""
    guard = guard_of(module._trainer)
    if guard is None:
        guard = _DEFAULT
    return guard.check(module, loss, batch_idx)


_DEFAULT = NonFiniteGuard("stop")


def fit_with_rollback(trainer: pl.Trainer, fit: Callable[[pl.Trainer, str | None], None], ckpt_path: str | None,
                      rebuild: Callable[[], pl.Trainer]) -> pl.Trainer:
    """`fit(trainer, ckpt_path)`, and after a RollbackRequested, again on a fresh trainer from the
    checkpoint the guard picks. Returns the trainer that finished."""
    while True:
        try:
            fit(trainer, ckpt_path)
            return trainer
        except RollbackRequested as e:
            guard = guard_of(trainer)
            ckpt_path = str(guard.next_attempt(e))
            trainer = rebuild()
