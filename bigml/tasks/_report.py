"""What scoring a model produces (bigml.tasks.Task.evaluate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    """What scoring a model produced: metrics.json keys plus the tables a person reads."""

    task: str
    metrics: dict[str, Any]
    label_names: list[str] = field(default_factory=list)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confusion: list[list[int]] | None = None
    rows: list[dict[str, Any]] | None = None  # predictions (when asked for)
    outputs: Any = None  # the head's outputs, row by row (keep_outputs=True: ensembles combine them)
    targets: Any = None  # ... and the labels they are scored against

    @property
    def kind(self) -> str:  # the name reports used before tasks were modules
        return self.task
