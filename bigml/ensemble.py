"""Ensembles: `bigml eval model.path=[dirA,dirB,dirC]` scores each member and their average.

    every member: loaded and scored like `bigml eval` (its own tokenizer / image processor, the same
    rows), keeping its outputs --task.combine_outputs--> the ensemble's outputs: the mean of the
    members' probabilities (classification, multilabel) or values (regression) --the task's
    metrics--> metrics.json: the ensemble's scores under the usual keys (gates apply to them),
    `members` (each member's scores), `best_member`, `best_member_<m>` and `ensemble_gain_<m>` for
    the task's headline metric <m> (positive: the ensemble is better, whichever way <m> improves).

Members must be models of one task with one label set (in any order of ids: outputs are aligned
by label name); anything else is refused with exit 2, before any scoring.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from bigml.errors import ConfigError, DataError

log = logging.getLogger("bigml")


def _load(paths: list[str], cfg):
    from bigml.evaluation import load_model_for_eval

    members = []
    for p in paths:
        model, inputs, task = load_model_for_eval(p, cfg)
        members.append((p, model, inputs, task))
    first_path, first_model, _, first_task = members[0]
    names0 = first_task.model_label_names(first_model.config)
    for p, model, _, task in members[1:]:
        if task is not first_task:
            raise DataError(f"model.path: {p} is a {task.name} model and {first_path} a {first_task.name} model; "
                            f"an ensemble averages models of one task")
        names = task.model_label_names(model.config)
        if sorted(names) != sorted(names0):
            raise DataError(f"model.path: {p} predicts the labels {', '.join(names[:8])} and {first_path} "
                            f"{', '.join(names0[:8])}; ensemble members need the same label set")
    if not first_task.ensembles:
        raise ConfigError("model.path", f"{first_task.name} models cannot be ensembled",
                          "ensembles average classification probabilities or regression values")
    return members, names0


def _aligned(outputs: torch.Tensor, names: list[str], reference: list[str]) -> torch.Tensor:
    """A member's class columns in the first member's label order."""
    if not names or names == reference:
        return outputs
    return outputs[:, [names.index(n) for n in reference]]


def run(cfg: DictConfig, write_report, print_report) -> dict[str, Any]:
    """`bigml eval` with a list of model paths; `write_report` / `print_report` are bigml eval's
    (report.json + confusion matrix PNG, per-class tables)."""
    from bigml.commands.runner import print_summary
    from bigml.evaluation import gate_status
    from bigml.run_dir import RunDir
    from bigml.tasks import Report

    paths = [str(p) for p in cfg.model.path]
    if len(paths) < 2:
        raise ConfigError("model.path", f"an ensemble needs at least 2 models, got {len(paths)}",
                          "model.path=[dirA,dirB] (or a single model.path=dir)")
    if len(set(paths)) < len(paths):
        raise ConfigError("model.path", "the same model is listed twice")
    members, names = _load(paths, cfg)
    task = members[0][3]
    run_dir = RunDir.open(cfg)
    torch.manual_seed(int(cfg.seed))
    split = str(cfg.eval.get("split") or "auto")
    outputs, member_metrics, targets = [], [], None
    for p, model, inputs, member_task in members:
        report = member_task.evaluate(model, inputs, cfg, split=split, keep_outputs=True)
        own = member_task.model_label_names(model.config)
        if report.outputs is None:
            raise DataError(f"data: no rows to score for {p}")
        if targets is None:
            targets = report.targets
        elif report.targets.shape != targets.shape:
            raise DataError(f"model.path: {p} scored {len(report.targets)} rows and the first member {len(targets)}")
        if own and own != names:  # same labels, other ids: compare targets by name
            remap = torch.tensor([names.index(n) for n in own])
            if not torch.equal(remap[report.targets.long()], targets.long()):
                raise DataError(f"model.path: {p} was scored on other rows than {paths[0]}")
        elif not torch.equal(report.targets, targets):
            raise DataError(f"model.path: {p} was scored on other rows than {paths[0]}")
        outputs.append(_aligned(report.outputs, own, names))
        member_metrics.append({"model": p, **report.metrics})
        log.info("member %s: %s", p, ", ".join(f"{k} {v:.4g}" for k, v in report.metrics.items()
                                                if k in (task.headline_metric, "loss") and isinstance(v, float)))
        del model

    combined = task.combine_outputs(outputs)
    threshold = float((cfg.get("task") or {}).get("threshold") or 0.5)
    scorer = task.scorer(names, int(cfg.eval.get("ece_bins") or 15), threshold)
    scorer.update(combined, targets)
    scores = scorer.compute()
    head = task.headline_metric
    better = (lambda a, b: a < b) if task.direction(head) == "min" else (lambda a, b: a > b)
    best = member_metrics[0]
    for m in member_metrics[1:]:
        if better(m[head], best[head]):
            best = m
    gain = scores[head] - best[head] if task.direction(head) == "max" else best[head] - scores[head]
    metrics: dict[str, Any] = {"command": "eval", "task": task.name, "model": paths, "ensemble": "mean", **scores,
                               "members": member_metrics, "best_member": best["model"],
                               f"best_member_{head}": best[head], f"ensemble_gain_{head}": round(gain, 6),
                               "wall_time_s": None}
    conf = scorer.confusion()
    report = Report(task.name, scores, names, scorer.per_class(), conf.tolist() if conf is not None else None)
    write_report(run_dir.path, report, plot=bool(cfg.eval.get("plot", True)))
    print_report(report)
    status, failed = gate_status(metrics, cfg.eval)
    run_dir.write_metrics(metrics, status=status)
    if failed is not None:
        raise failed
    _print_members(member_metrics, scores, head)
    print_summary("bigml eval (ensemble)", {"task": task.name, "members": len(paths), head: scores[head],
                                            f"best_member_{head}": best[head], f"ensemble_gain_{head}": round(gain, 6),
                                            "best_member": best["model"]})
    return metrics


def _print_members(members: list[dict[str, Any]], ensemble: dict[str, Any], head: str) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = [k for k in (head, "f1_macro", "mse", "r2", "loss") if k in ensemble]
    keys = list(dict.fromkeys(keys))
    t = Table(title="ensemble members", title_justify="left")
    t.add_column("model")
    for k in keys:
        t.add_column(k, justify="right")
    for m in members:
        t.add_row(m["model"], *[f"{m[k]:.4g}" for k in keys])
    t.add_row("ensemble (mean)", *[f"{ensemble[k]:.4g}" for k in keys])
    Console(stderr=True).print(t)
