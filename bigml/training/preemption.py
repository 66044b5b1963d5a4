"""Preemption: SIGTERM or SIGUSR1 (what SLURM, Kubernetes and spot instances send before they kill
a job) ends a training run at the next step boundary with a checkpoint, and an exit code that says
"preempted, resume me" rather than success or failure.

    exit code 143 (128 + SIGTERM, for either signal)   metrics.json "status": "preempted"
    checkpoints/last.ckpt holds the state after the last completed step: `resume=auto` continues
    exactly where the run stopped (on CPU with a fixed seed it ends equal to an uninterrupted run)

A requeue script: `bigml pretrain ... resume=auto; [ $? -eq 143 ] && scontrol requeue $SLURM_JOB_ID`
(sbatch --signal=USR1@90 gives the job 90 s to reach the step boundary).

Why not Lightning's own handling: Lightning's SIGTERM handler raises `SIGTERMException`, a
`SystemExit` with no code, so the process exits 0 with no checkpoint; its SLURM SIGUSR1 handler
saves an `hpc_ckpt_*.ckpt` that `resume=auto` does not know, and only under SLURM. While training,
bigml's handler replaces Lightning's; outside training (start-up, tokenization, the final export)
a signal stops the command at once with the same exit code and status, since there is no state to
save that is not already on disk.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl

from bigml.errors import EXIT_PREEMPTED, Preempted

log = logging.getLogger("bigml")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
__all__ = ["EXIT_PREEMPTED", "Preempted", "PreemptionCheckpoint", "preemption_signals", "requested"]


class _State:
    training = False          # a PreemptionCheckpoint is active: defer to the next step boundary
    received: int | None = None


_state = _State()


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _handler(signum, _frame) -> None:
    first = _state.received is None
    _state.received = signum
    if _state.training:
        if first:
            log.warning("received %s: saving a checkpoint at the end of this step, then exiting", _name(signum))
        return
    raise Preempted(f"received {_name(signum)}; stopped before training or after it, checkpoints/ holds "
                    f"the last saved state (resume=auto continues)")


@contextlib.contextmanager
def preemption_signals() -> Iterator[None]:
    """Around a whole command: the preemption signals raise `Preempted` (outside training) or ask
    the training loop to stop at the next step boundary."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _state.received, _state.training = None, False
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _state.received, _state.training = None, False


def requested() -> bool:
    return _state.received is not None


class PreemptionCheckpoint(pl.Callback):
    """Saves `path` and raises `Preempted` at the first step boundary after a preemption signal.

    The checkpoint is taken in `on_train_batch_end`, the same point Lightning's periodic checkpoints
    are taken, so resuming from it is as exact as resuming from those. Under DDP the ranks agree
    (one tiny all-reduce per step) so that they all stop after the same step.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lightning_handlers: dict = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registered its own SIGTERM handler when fit started; ours takes over for training.
        if threading.current_thread() is threading.main_thread():
            self._lightning_handlers = {s: signal.getsignal(s) for s in SIGNALS}
            for s in SIGNALS:
                signal.signal(s, _handler)
        _state.training = True

    def _stop_requested(self, trainer: pl.Trainer) -> bool:
        stop = requested()
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        return stop

    def _save_and_stop(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(str(self.path), weights_only=False)
        _state.training = False
        signame = _name(_state.received) if _state.received else "a preemption signal (on another rank)"
        raise Preempted(f"preempted by {signame} after step {trainer.global_step}; saved {self.path}; "
                        f"resume=auto (or resume={self.path.parent.parent}) continues from it")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stop_requested(trainer):
            self._save_and_stop(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a signal that came during the last step's validation: the training itself is complete
        _state.training = False
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _state.training = False
        self._restore()

    def _restore(self) -> None:
        if self._lightning_handlers and threading.current_thread() is threading.main_thread():
            for s, h in self._lightning_handlers.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._lightning_handlers = {}
