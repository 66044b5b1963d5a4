"""Scoring models: the metrics `bigml eval` writes, as a library (finetune and compress use it too).

API (stable; `bigml compress` builds on it):

    load_model_for_eval(model_path, cfg) -> (model, tokenizer, task)
        Loads a model directory for scoring (bigml.models.loading). The task is cfg.task.name
        unless it is `auto`, else what the directory describes (bigml.json, then its head). The
        tokenizer comes from cfg.tokenizer.path, else the model directory (DataError if none).

    evaluate_model(model, tokenizer, cfg, split="test", task=None) -> dict[str, float]
        Scores an in-memory model (possibly quantized or pruned: only `model(**batch)` is called,
        parameter dtypes are not assumed) on cfg.data with the task's metrics (bigml.tasks: each
        task's `metrics` are its keys), plus `examples` (rows scored). `split` is test | val |
        train | all | auto (see conf/eval.yaml).

    evaluate_detailed(...) -> Report   same, plus the per-class table, confusion matrix and rows'
        predictions (for reports and predictions.jsonl).

    check_gates(metrics, cfg.eval) raises GateFailed (exit 1) for eval.fail_below / fail_above.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bigml.errors import ConfigError, GateFailed, UsageError, did_you_mean
from bigml.tasks import Report, Task, get_task
from bigml.tasks.base import LOWER_IS_BETTER, Scorer  # noqa: F401 - part of this module's API
from bigml.tasks.token import EntitySpans  # noqa: F401 - part of this module's API

log = logging.getLogger("bigml")


def task_choice(cfg) -> str | None:
    """cfg.task.name, or None for `auto` (and commands without a task group)."""
    task = cfg.get("task")
    name = task.get("name") if task is not None else None
    return None if name in (None, "auto") else str(name)


def load_model_for_eval(model_path, cfg) -> tuple[Any, Any, Task]:
    from bigml.models.loading import load_model, model_task, read_config

    if not model_path:
        raise ConfigError("model.path", "required", "set model.path=<a model directory>")
    path = str(Path(str(model_path)).expanduser())
    config = read_config(path)
    own = model_task(config, path)
    task = get_task(task_choice(cfg)) if task_choice(cfg) else own
    if task is not own:
        task.check_model(own, str(model_path), config)
    tok_path = (cfg.get("tokenizer") or {}).get("path") if cfg.get("tokenizer") is not None else None
    from bigml.models.loading import require_weights

    require_weights(path)
    tokenizer = task.load_preprocessor(str(tok_path or path), "tokenizer.path" if tok_path else "model.path")
    model, task = load_model(path, task, config=config)
    return model, tokenizer, task


def evaluate_model(model, tokenizer, cfg, split: str = "test", task: Task | str | None = None) -> dict[str, float]:
    return evaluate_detailed(model, tokenizer, cfg, split=split, task=task).metrics


def evaluate_detailed(model, tokenizer, cfg, split: str = "test", task: Task | str | None = None,
                      keep_rows: bool = False) -> Report:
    if task is None:
        from bigml.models.loading import model_task

        task = getattr(model, "_bigml_task", None) or model_task(model.config, None, task_choice(cfg))
    return get_task(task).evaluate(model, tokenizer, cfg, split=split, keep_rows=keep_rows)


# -- CI gates ----------------------------------------------------------------------------------------

def check_gates(metrics: dict[str, Any], eval_cfg, prefix: str = "") -> list[str]:
    """Raise GateFailed listing every unmet gate; returns the lines of the gates that passed."""
    failed, passed = [], []
    for direction in ("fail_below", "fail_above"):
        gates = eval_cfg.get(direction) or {}
        for name, limit in gates.items():
            if limit is None:
                continue
            key = f"{prefix}{name}"
            if key not in metrics or not isinstance(metrics[key], (int, float)):
                have = [k.removeprefix(prefix) for k, v in metrics.items() if isinstance(v, float) and k.startswith(prefix)]
                raise UsageError(f"eval.{direction}.{name}: this evaluation has no metric {name}"
                                 f"{did_you_mean(name, have)}; it has {', '.join(have)}")
            value = float(metrics[key])
            bad = value < float(limit) if direction == "fail_below" else value > float(limit)
            line = f"{name} = {value:.4g} {'<' if direction == 'fail_below' else '>'} {float(limit):.4g}" if bad else \
                f"{name} = {value:.4g} ({'>=' if direction == 'fail_below' else '<='} {float(limit):.4g})"
            (failed if bad else passed).append(line)
    if failed:
        raise GateFailed(f"gate failed: {'; '.join(failed)} (eval.fail_below / eval.fail_above)")
    return passed


def check_gate_names(eval_cfg, task: Task) -> None:
    """Before any work: every gated metric is one the task reports (UsageError naming them)."""
    for direction in ("fail_below", "fail_above"):
        for name, limit in (eval_cfg.get(direction) or {}).items():
            if limit is not None and name not in task.metrics:
                raise UsageError(f"eval.{direction}.{name}: {task.name} has no metric {name}"
                                 f"{did_you_mean(name, task.metrics)}; it has {', '.join(task.metrics)}")


def gate_status(metrics: dict[str, Any], eval_cfg, prefix: str = "") -> tuple[str, GateFailed | None]:
    """Apply the gates to `metrics` (recording the outcome under "gate"): the run status to write,
    and the error to raise after writing it."""
    try:
        passed = check_gates(metrics, eval_cfg, prefix)
    except GateFailed as e:
        metrics["gate"] = str(e)
        return "gate_failed", e
    if passed:
        metrics["gate"] = "passed: " + "; ".join(passed)
    return "completed", None


__all__ = ["Report", "Scorer", "check_gates", "gate_status", "evaluate_detailed", "evaluate_model", "load_model_for_eval"]
