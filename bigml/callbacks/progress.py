"""Progress for people: a rich bar on a terminal, plain lines in logs and CI.

A line every `every_n_steps` steps and after each validation, e.g.
    step 100/300 | loss 4.213 | lr 9.1e-04 | 12.3k tok/s | eta 0:00:41
    step 100/300 | val_loss 4.502 | val_perplexity 90.2
"""

from __future__ import annotations

import datetime
import logging
import time

import pytorch_lightning as pl

from bigml.callbacks.throughput import ThroughputMeter

log = logging.getLogger("bigml")


def _fmt(v: float) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1e4 or (abs(v) < 1e-2 and v != 0):
        return f"{v:.3e}"
    return f"{v:.4g}"


class LogLines(pl.Callback):
    def __init__(self, every_n_steps: int = 10):
        self.every_n_steps = max(int(every_n_steps), 1)
        self._t0 = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._step0 = trainer.global_step

    def _meter(self, trainer) -> ThroughputMeter | None:
        return next((c for c in trainer.callbacks if isinstance(c, ThroughputMeter)), None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero or trainer.fit_loop._should_accumulate():
            return
        m = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps}" if trainer.max_steps > 0 else f"step {step}"]
        if "train_loss" in m:
            parts.append(f"loss {float(m['train_loss']):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        meter = self._meter(trainer)
        if meter and meter.tokens:
            tps = meter.summary()["tokens_per_sec"]
            parts.append(f"{tps / 1000:.1f}k tok/s")
        if trainer.max_steps > 0 and step > self._step0:
            rate = (time.perf_counter() - self._t0) / (step - self._step0)
            parts.append(f"eta {datetime.timedelta(seconds=int(rate * (trainer.max_steps - step)))}")
        log.info(" | ".join(parts))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        keys = [k for k in m if k.startswith("val_")]
        if keys:
            parts = [f"step {trainer.global_step}"] + [f"{k} {_fmt(float(m[k]))}" for k in sorted(keys)]
            log.info(" | ".join(parts))
