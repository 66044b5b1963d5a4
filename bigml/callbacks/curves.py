"""curves.png in the run directory: training and validation loss, learning rate and throughput
against the step, drawn when training ends (matplotlib's Agg backend: no display needed).

The values are collected as training runs (not read back from a logger), so the picture exists
with logger=none too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from bigml.callbacks.throughput import ThroughputMeter

log = logging.getLogger("bigml")


class CurvesPlot(pl.Callback):
    def __init__(self, filename: str = "curves.png", every_n_steps: int = 1):
        self.filename, self.every_n_steps = filename, max(int(every_n_steps), 1)
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.lr: list[tuple[int, float]] = []
        self.speed: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            self.train.append((step, float(loss)))
        if trainer.optimizers:
            self.lr.append((step, float(trainer.optimizers[0].param_groups[0]["lr"])))
        meter = next((c for c in trainer.callbacks if isinstance(c, ThroughputMeter)), None)
        speed = meter.summary()["tokens_per_sec"] if meter is not None else None
        if speed is not None:
            self.speed.append((step, float(speed)))  # the run's average so far (the first steps excluded)

    def on_validation_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("val_loss")
        if loss is not None and not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(loss)))

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and (self.train or self.val):
            self.plot(Path(trainer.default_root_dir) / self.filename)

    def plot(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("loss", [("train", self.train), ("validation", self.val)], False),
                  ("learning rate", [("lr", self.lr)], False), ("tokens / s", [("throughput", self.speed)], False)]
        panels = [p for p in panels if any(series for _, series in p[1])]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
        for ax, (title, series, _) in zip(axes[0], panels, strict=True):
            for label, points in series:
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, label=label, marker="o" if len(points) < 30 else None, markersize=3)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if len(series) > 1:
                ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        log.info("curves: %s", out)
