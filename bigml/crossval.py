"""k-fold cross-validation of the finetune recipe: `bigml finetune cv.folds=5 [cv.refit=true]`.

    the training rows (data.path minus its test split; data.val_fraction is not carved) --seeded
    folds, stratified by label where the task stratifies (classification)--> k runs of the finetune
    recipe, each validating (early stopping, best checkpoint) on its held-out fold:
        <run>/fold-1/ ... <run>/fold-k/    each a complete finetune run (metrics.json, model/)
        <run>/metrics.json                 val_<m> / test_<m>: the mean over folds, val_<m>_std /
                                           test_<m>_std, `folds`: each fold's scores
        <run>/cv_table.md                  the table printed at the end (metric x fold, mean +- std)
        <run>/refit/                       cv.refit=true: one more run on every training row

The folds are bigml's own (a seeded deal of each class's shuffled rows), not scikit-learn's
StratifiedKFold, so they need no scikit-learn; the tests check them against it. Gates
(eval.fail_below / fail_above) apply to the means, once, after the last fold.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from omegaconf import DictConfig, open_dict

from bigml.errors import ConfigError, DataError

log = logging.getLogger("bigml")


def fold_indices(n: int, folds: int, seed: int, labels: list | None = None) -> list[np.ndarray]:
    """`folds` disjoint index arrays covering range(n). With labels, each class's rows are shuffled
    and dealt round-robin, continuing where the previous class stopped, so every fold gets its share
    of every class and fold sizes differ by at most one."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(n, dtype=np.int64)
    if labels is None:
        order = rng.permutation(n)
        assignment[order] = np.arange(n) % folds
    else:
        offset = 0
        groups: dict[Any, list[int]] = {}
        for i, y in enumerate(labels):
            groups.setdefault(y, []).append(i)
        for y in sorted(groups, key=str):
            idx = np.array(groups[y])
            rng.shuffle(idx)
            assignment[idx] = (np.arange(len(idx)) + offset) % folds
            offset += len(idx)
    return [np.flatnonzero(assignment == k) for k in range(folds)]


def check_folds(folds: int, n: int, labels: list | None) -> None:
    if folds < 2:
        raise ConfigError("cv.folds", f"{folds} is too few", "use at least 2 (5 or 10 are usual)")
    if folds > n:
        raise DataError(f"cv.folds={folds}: more folds than the {n} training rows; lower cv.folds")
    if labels is not None:
        counts: dict[Any, int] = {}
        for y in labels:
            counts[y] = counts.get(y, 0) + 1
        smallest = min(counts, key=lambda y: (counts[y], str(y)))
        if counts[smallest] < folds:
            raise DataError(f"cv.folds={folds}: more folds than the {counts[smallest]} rows of the smallest class "
                            f"({smallest!r}), so some folds would never see it; lower cv.folds to "
                            f"{max(counts[smallest], 2)} or fewer, or add examples of that class")


def _concat(parts):
    parts = [p for p in parts if p is not None and len(p)]
    if len(parts) == 1:
        return parts[0]
    import datasets

    if isinstance(parts[0], datasets.Dataset):
        return datasets.concatenate_datasets(parts)
    return type(parts[0]).concat(parts)


def _summary(fold_metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and (sample) std over folds of every numeric val_* / test_* score."""
    keys = [k for k, v in fold_metrics[0].items() if k.startswith(("val_", "test_")) and not k.endswith("_examples")
            and isinstance(v, (int, float)) and not isinstance(v, bool)]
    out: dict[str, float] = {}
    for k in keys:
        values = np.array([float(m[k]) for m in fold_metrics if isinstance(m.get(k), (int, float))])
        if not len(values):
            continue
        out[k] = round(float(values.mean()), 6)
        out[f"{k}_std"] = round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 6)
    return out


def _table(fold_metrics: list[dict[str, Any]], summary: dict[str, float], task) -> tuple[list[str], list[list[str]]]:
    shown = [k for k in summary if not k.endswith("_std") and k.split("_", 1)[1] in (*task.summary_metrics, "loss")]
    header = ["metric", *[f"fold {i + 1}" for i in range(len(fold_metrics))], "mean ± std"]
    rows = [[k, *[f"{float(m[k]):.4g}" for m in fold_metrics], f"{summary[k]:.4g} ± {summary[k + '_std']:.2g}"]
            for k in shown]
    return header, rows


def print_table(header: list[str], rows: list[list[str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    Console(stderr=True).print(t)


def cross_validate(cfg: DictConfig, train_one: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Run `train_one(cfg, run_dir=<fold dir>, raw=<fold rows>)` (bigml.commands.finetune.run) on
    each fold, then summarize; cv.refit=true trains once more on every training row."""
    from bigml.atomic import atomic_write_bytes
    from bigml.commands.runner import print_summary
    from bigml.evaluation import check_gate_names, gate_status
    from bigml.run_dir import RunDir
    from bigml.tasks import get_task

    folds = int(cfg.cv.folds)
    task = get_task(cfg.task.name)
    if not task.finetunable:
        raise ConfigError("task", f"{task.name!r} cannot be finetuned")
    task = task.for_config(cfg)
    check_gate_names(cfg.eval, task)
    if folds < 2:
        check_folds(folds, 0, None)
    run_dir = RunDir.open(cfg)

    # the pool: every training row (and data.val_path's); the test split stays out of every fold
    read_cfg = copy.deepcopy(cfg)
    with open_dict(read_cfg):
        read_cfg.data.val_fraction = 0.0
    raw = task.read_splits(read_cfg, int(cfg.seed))
    pool = _concat([raw.train, raw.val])
    labels = list(pool["label"]) if task.stratify else None
    check_folds(folds, len(pool), labels)
    parts = fold_indices(len(pool), folds, int(cfg.seed), labels)
    log.info("cv: %d folds of %s rows (%s)%s", folds, "/".join(str(len(p)) for p in parts),
             "stratified by label" if labels is not None else "shuffled",
             f"; the {len(raw.test)} test rows are scored by every fold" if raw.test is not None else "")

    # gates apply to the means, after the last fold, not to each fold
    fold_cfg = copy.deepcopy(cfg)
    with open_dict(fold_cfg):
        fold_cfg.eval.fail_below, fold_cfg.eval.fail_above = {}, {}
    results: list[dict[str, Any]] = []
    for k, held_out in enumerate(parts, 1):
        keep = np.setdiff1d(np.arange(len(pool)), held_out)
        fold_raw = copy.copy(raw)
        fold_raw.train, fold_raw.val = pool.select(keep.tolist()), pool.select(held_out.tolist())
        fold_raw.all = None
        log.info("cv: fold %d of %d (%d training rows, %d held out)", k, folds, len(keep), len(held_out))
        results.append(train_one(_logged_as(fold_cfg, f"fold-{k}"), run_dir=_sub_run(run_dir, f"fold-{k}"), raw=fold_raw))

    summary = _summary(results)
    metrics: dict[str, Any] = {"command": "finetune", "task": task.name, "cv_folds": folds,
                               "model": str(cfg.model.get("path") or cfg.model.get("name")),
                               "cv_stratified": labels is not None, "train_examples": len(pool), **summary,
                               "folds": [{"fold": i + 1, "run_dir": str(run_dir.path / f"fold-{i + 1}"),
                                          **{k: m[k] for k in summary if k in m}} for i, m in enumerate(results)]}
    header, rows = _table(results, summary, task)
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *["| " + " | ".join(r) + " |" for r in rows]]) + "\n"
    atomic_write_bytes(run_dir.path / "cv_table.md", markdown.encode())

    if cfg.cv.get("refit"):
        # every training row trains; with nothing held out, validation (early stopping, the best
        # checkpoint) sees the same rows, so its val_* are training scores, reported under refit
        refit_raw = copy.copy(raw)
        refit_raw.train, refit_raw.val, refit_raw.all = pool, pool, None
        log.info("cv: refit on all %d training rows", len(pool))
        refit = train_one(_logged_as(fold_cfg, "refit"), run_dir=_sub_run(run_dir, "refit"), raw=refit_raw)
        metrics["refit"] = {k: v for k, v in refit.items() if k.startswith(("val_", "test_")) or k in ("step", "epochs")}
        metrics["model_dir"] = refit.get("model_dir")
    status, failed = gate_status(metrics, cfg.eval, prefix="test_" if raw.test is not None else "val_")
    run_dir.write_metrics(metrics, status=status)
    print_table(header, rows, f"{folds}-fold cross-validation ({task.name})")
    if failed is not None:
        raise failed
    show = {k: (f"{v:.4g} ± {summary[k + '_std']:.2g}" if isinstance(v, float) and k + "_std" in summary else v)
            for k, v in summary.items() if not k.endswith("_std") and k.split("_", 1)[1] in task.summary_metrics}
    print_summary("bigml finetune (cross-validation)", {"task": task.name, "folds": folds, **show,
                                                        **({"model_dir": metrics["model_dir"]} if "model_dir" in metrics
                                                           else {})})
    return metrics


def _logged_as(cfg: DictConfig, name: str) -> DictConfig:
    """The run's logger writes each fold's curves apart (logs/<name>/metrics.csv), not over each other."""
    if cfg.get("logger") is None or "version" not in cfg.logger:
        return cfg
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.logger.version = name
    return out


def _sub_run(parent, name: str):
    from bigml.run_dir import RunDir

    path = parent.path / name
    path.mkdir(parents=True, exist_ok=False)
    return RunDir(path)


__all__ = ["check_folds", "cross_validate", "fold_indices"]
