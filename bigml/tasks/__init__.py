"""Tasks: what a model learns to do, one module per task.

A task owns everything that differs between tasks: the transformers auto class and head arguments,
how raw examples are read, encoded and batched, the loss, the metrics (names and direction), the
rows of predictions.jsonl, and the distillation loss. Commands ask the task; they never compare
task names. Each module in this package that defines a module-level `TASK` is registered under
`TASK.name`, which is also the name of its config, conf/task/<name>.yaml. Adding a task is one
module here plus that YAML (README, "Add a task").

    get_task(name)                     -> Task (UsageError naming the choices for an unknown name)
    infer_task(config, metadata=None)  -> the task a model directory's config (its head) and
                                          bigml.json describe
    language_model_task(config)        -> causal_lm / masked_lm for continued pretraining
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from bigml.errors import ConfigError, DataError, did_you_mean
from bigml.tasks._report import Report
from bigml.tasks.base import LabeledTask, LanguageModelTask, Task

__all__ = ["LabeledTask", "LanguageModelTask", "Report", "Task", "all_tasks", "get_task", "infer_task",
           "language_model_task", "task_names"]


@lru_cache(maxsize=1)
def all_tasks() -> dict[str, Task]:
    """name -> task, discovered from the modules of this package (those that define TASK)."""
    found: dict[str, Task] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        task = getattr(module, "TASK", None)
        if isinstance(task, Task):
            if task.name in found:
                raise RuntimeError(f"two tasks are named {task.name!r} ({info.name}.py and another module)")
            found[task.name] = task
    return dict(sorted(found.items()))


def task_names(predicate=None) -> list[str]:
    return [n for n, t in all_tasks().items() if predicate is None or predicate(t)]


def get_task(name, key: str = "task") -> Task:
    if isinstance(name, Task):
        return name
    tasks = all_tasks()
    name = str(name)
    if name not in tasks:
        raise ConfigError(key, f"unknown task {name!r}{did_you_mean(name, tasks)}", f"choose one of {', '.join(tasks)}")
    return tasks[name]


def infer_task(config, metadata: dict | None = None) -> Task:
    """The task of a model directory: what bigml recorded in bigml.json when it still fits the
    config's head (an SFT model is a causal LM with a chat template), else the first task, by
    `infer_priority`, whose `claims(config)` holds."""
    recorded = (metadata or {}).get("task")
    tasks = all_tasks()
    if recorded in tasks and tasks[recorded].fits(config):
        return tasks[recorded]
    for task in sorted(tasks.values(), key=lambda t: t.infer_priority):
        if task.claims(config):
            return task
    return language_model_task(config)  # a bare encoder / decoder: its family's pretraining objective


def language_model_task(config) -> Task:
    """causal_lm or masked_lm: the pretraining objective of a model family (any head), for
    continued pretraining from model.path."""
    for task in sorted(all_tasks().values(), key=lambda t: t.infer_priority):
        if isinstance(task, LanguageModelTask) and task.pretrains(config):
            return task
    raise DataError(f"model.path: a {config.model_type!r} model is neither a masked nor a causal language model, "
                    f"nor has a task head bigml knows")
