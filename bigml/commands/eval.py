"""bigml eval: score a model directory on labeled data or a text corpus.

    model.path (any HF dir) --load_model_for_eval--> (model, tokenizer, task)
    cfg.data (+ eval.split) --task.evaluate--> metrics (torchmetrics, batch by batch)
    --> <run>/metrics.json, <run>/report.json, <run>/confusion_matrix.png, tables on stderr
    --> eval.fail_below / eval.fail_above: exit 1 when a gate is not met
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bigml.atomic import atomic_write_json
from bigml.commands.runner import print_summary
from bigml.evaluation import Report, evaluate_detailed, gate_status, load_model_for_eval
from bigml.run_dir import RunDir, is_global_zero_process

log = logging.getLogger("bigml")


_STARTED: list[float] = []


def run(cfg: DictConfig) -> dict[str, Any]:
    import torch

    if OmegaConf.is_list(cfg.model.get("path")):  # model.path=[a,b,c]: an ensemble (bigml.ensemble)
        from bigml.ensemble import run as run_ensemble

        return run_ensemble(cfg, write_report, print_report)
    run_dir = RunDir.open(cfg)
    _STARTED[:] = [run_dir.started]
    torch.manual_seed(int(cfg.seed))
    model, tokenizer, task = load_model_for_eval(cfg.model.get("path"), cfg)
    log.info("model: %s (%s) | run directory: %s", cfg.model.path, task.name, run_dir.path)
    report = evaluate_detailed(model, tokenizer, cfg, split=str(cfg.eval.get("split") or "auto"), task=task,
                               keep_rows=bool(cfg.eval.get("predictions")))
    # metrics.json holds only what the model and data determine (two runs give identical files);
    # the wall time goes to report.json
    metrics: dict[str, Any] = {"command": "eval", "task": task.name, "model": str(cfg.model.path), **report.metrics,
                               "wall_time_s": None}
    write_report(run_dir.path, report, plot=bool(cfg.eval.get("plot", True)))
    if report.rows is not None:
        write_predictions(run_dir.path / "predictions.jsonl", report.rows)
    print_report(report)
    status, failed = gate_status(metrics, cfg.eval)
    run_dir.write_metrics(metrics, status=status)
    if failed is not None:
        raise failed
    print_summary("bigml eval", {k: v for k, v in metrics.items() if k not in ("command",)})
    return metrics


def write_report(path: Path, report: Report, plot: bool = True) -> None:
    if not is_global_zero_process():
        return
    payload = {"task": report.task, "wall_time_s": round(time.time() - _STARTED[0], 2) if _STARTED else None, "metrics": report.metrics, "labels": report.label_names,
               "per_class": report.per_class, "confusion_matrix": report.confusion}
    atomic_write_json(path / "report.json", payload)
    if plot and report.confusion is not None:
        plot_confusion(report.confusion, report.label_names, path / "confusion_matrix.png")


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    from bigml.atomic import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def plot_confusion(matrix: list[list[int]], names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), max(3.5, 0.6 * n + 1.5)))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(r) for r in matrix) if matrix else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", color="white" if matrix[i][j] > top / 2 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def print_report(report: Report) -> None:
    if not is_global_zero_process() or not report.per_class:
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    t = Table(title="per class", title_justify="left")
    for col in ("label", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="left" if col == "label" else "right")
    for row in report.per_class:
        t.add_row(row["label"], f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                  "" if row["support"] is None else str(int(row["support"])))
    console.print(t)
    if report.confusion is not None:
        c = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
        c.add_column("")
        for name in report.label_names:
            c.add_column(name, justify="right")
        for name, row in zip(report.label_names, report.confusion, strict=False):
            c.add_row(name, *[str(v) for v in row])
        console.print(c)
