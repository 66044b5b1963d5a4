"""Training speed: tokens/s, samples/s, MFU and time spent waiting for data.

Lightning's ThroughputMonitor pushes windowed rates to the logger only; bigml also needs run totals
for metrics.json and the summary table, and the data-wait share, so it measures here.
Validation, checkpointing and the first `warmup_steps` steps (torch.compile, allocator warm-up)
are left out of the steady-state figures.
"""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch


def _sync(trainer: pl.Trainer) -> None:
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize()


class ThroughputMeter(pl.Callback):
    def __init__(self, flops_per_token: float | None, peak_flops: float | None, warmup_steps: int = 3,
                 log_every_n_steps: int = 10):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.warmup_steps, self.log_every_n_steps = warmup_steps, log_every_n_steps
        self.step_time = 0.0     # seconds inside training steps, after warm-up
        self.wait_time = 0.0     # seconds between steps (data loading, logging), after warm-up
        self.tokens = 0          # tokens in steady-state steps, all processes
        self.samples = 0
        self.batches = 0
        self._t_start: float | None = None
        self._t_end: float | None = None  # end of the previous batch; None after a pause (validation)
        self.first_step_time: float | None = None
        self.world_size = 1

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        _sync(trainer)
        now = time.perf_counter()
        if self._t_end is not None and self.batches >= self.warmup_steps:
            self.wait_time += now - self._t_end
        self._t_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        _sync(trainer)
        now = time.perf_counter()
        dt = now - (self._t_start or now)
        if self.first_step_time is None:
            self.first_step_time = dt
        if self.batches >= self.warmup_steps:
            self.step_time += dt
            n, b = _tokens_and_samples(batch)
            self.tokens += n * trainer.world_size
            self.samples += b * trainer.world_size
        self.batches += 1
        self._t_end = now
        if self.tokens and trainer.global_step % self.log_every_n_steps == 0:
            m = self.summary()
            pl_module.log("tokens_per_sec", m["tokens_per_sec"], on_step=True, on_epoch=False)
            if m.get("mfu") is not None:
                pl_module.log("mfu", m["mfu"], on_step=True, on_epoch=False)

    def _pause(self, *_: Any, **__: Any) -> None:
        self._t_end = None

    on_validation_start = _pause
    on_save_checkpoint = _pause

    def summary(self) -> dict[str, float | None]:
        total = self.step_time + self.wait_time
        if total <= 0 or not self.tokens:
            return {"tokens_per_sec": None, "samples_per_sec": None, "mfu": None, "data_wait_fraction": None}
        tps = self.tokens / total
        mfu = None
        if self.flops_per_token and self.peak_flops:
            # the peak is per device; tokens are summed over all processes
            mfu = tps * self.flops_per_token / (self.peak_flops * self.world_size)
        return {
            "tokens_per_sec": tps,
            "samples_per_sec": self.samples / total,
            "mfu": mfu,
            "data_wait_fraction": self.wait_time / total,
        }

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.world_size = trainer.world_size


def _tokens_and_samples(batch: Any) -> tuple[int, int]:
    """Tokens and examples in a batch: token ids (a tensor, or input_ids); batches without tokens
    (images, table rows: their first tensor) count one "token" per example."""
    if torch.is_tensor(batch):
        return batch.numel(), batch.shape[0]
    if "input_ids" in batch:
        return int(batch["input_ids"].numel()), int(batch["input_ids"].shape[0])
    first = next(v for v in batch.values() if torch.is_tensor(v))
    return int(first.shape[0]), int(first.shape[0])
