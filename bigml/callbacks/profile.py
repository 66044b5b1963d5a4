"""debug=profiler: the PyTorch profiler over a few training steps, written to the run directory as
a Chrome trace (chrome://tracing, Perfetto) and an operator table (operators.txt, and operators.json:
the operators by self CPU time with their share of the total).

A callback around torch.profiler rather than Lightning's PyTorchProfiler, which breaks when a run
calls validate, fit and validate again (as bigml pretrain does) and gives no trace for short runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

log = logging.getLogger("bigml")


class TorchProfile(pl.Callback):
    def __init__(self, dirpath: str, skip_steps: int = 2, steps: int = 5, row_limit: int = 30):
        self.dirpath, self.skip, self.steps, self.row_limit = Path(dirpath), int(skip_steps), int(steps), int(row_limit)
        self._prof = None
        self._seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._prof is None and self._seen == self.skip and trainer.is_global_zero:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += 1
        if self._prof is not None and self._seen >= self.skip + self.steps:
            self._finish()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._prof is not None:
            self._finish()

    def _finish(self) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        trace = self.dirpath / "trace.json"
        prof.export_chrome_trace(str(trace))
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.row_limit)
        (self.dirpath / "operators.txt").write_text(table + "\n")
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        rows = [{"name": e.key, "self_cpu_time_us": round(e.self_cpu_time_total, 1), "calls": e.count,
                 "share": round(e.self_cpu_time_total / total, 4)} for e in events[:self.row_limit]]
        (self.dirpath / "operators.json").write_text(json.dumps({"steps": self.steps, "operators": rows}, indent=1) + "\n")
        log.info("profiler: %d steps -> %s (Chrome trace) and %s", self.steps, trace, self.dirpath / "operators.txt")
