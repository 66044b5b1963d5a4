"""Sweeps (`bigml <command> -m ...`): checked before they start, summarized when they end.

Before any job runs, every combination of a grid sweep is composed, so a typo in the fifth value
fails in a second instead of after four trainings, and DDP inside a sweep (broken upstream:
Lightning #11300, Hydra #2070: each DDP child re-runs the whole sweep) is refused up front.

After the sweep, `SweepSummary` (a Hydra callback, so it runs in the launching process whatever the
launcher) reads each job's metrics.json and .hydra/overrides.yaml and writes
<sweep dir>/summary.csv, summary.json and a table sorted by `sweep.metric`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bigml.errors import UsageError

log = logging.getLogger("bigml")

# Outcome of the last sweep run in this process, read by the CLI for its exit code.
LAST_SWEEP: dict[str, Any] = {}


def expand_grid(overrides: list[str]) -> list[list[str]] | None:
    """The job override lists of a grid sweep (Hydra's BasicSweeper semantics); None when the sweep
    uses another sweeper (optuna's interval(...) etc.), whose jobs can't be listed in advance."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.value_type == ValueType.INTERVAL_SWEEP for o in parsed):
        return None
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def check_sweep(command: str, config_dir: str, overrides: list[str]) -> int:
    """Compose every job of a grid sweep; raise UsageError on the first bad one. Returns the job count."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    jobs = expand_grid(overrides)
    if jobs is None:
        return -1
    # hydra.* and hydra/* overrides configure the launcher/sweeper; compose() checks job configs.
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            probe = compose(command, overrides=[o for o in overrides if o.startswith(("hydra/", "hparams_search=", "launcher="))
                                                and "," not in o], return_hydra_config=True)
            if str(OmegaConf.select(probe, "hydra.sweeper._target_", default="")).endswith("OptunaSweeper"):
                return -1  # the search space is the sweeper's, not a grid
            for job in jobs:
                job = [o for o in job if not o.startswith(("hydra.", "hydra/"))]
                cfg = compose(command, overrides=job)
                _refuse_ddp(cfg, job)
    finally:
        GlobalHydra.instance().clear()
    return len(jobs)


def _refuse_ddp(cfg: DictConfig, job: list[str]) -> None:
    trainer = cfg.get("trainer")
    if trainer is None:
        return
    strategy = str(trainer.get("strategy", "auto"))
    devices = trainer.get("devices", 1)
    many = (isinstance(devices, int) and devices > 1) or devices in (-1, "auto", "-1") or int(trainer.get("num_nodes", 1)) > 1
    if strategy.startswith(("ddp", "fsdp", "deepspeed")) and many:
        raise UsageError(
            f"a sweep job uses {strategy} on {devices} devices ({' '.join(job)}); DDP inside a multirun sweep "
            "re-runs the whole sweep in every process (Lightning #11300), so bigml refuses it: run each "
            "configuration as its own command (a shell loop), or sweep on one device per job"
        )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class SweepSummary(Callback):
    """Hydra callback: summary.csv / summary.json / a table for every multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        settings = config.get("sweep") or {}
        metric = str(settings.get("metric", "val_loss"))
        mode = str(settings.get("mode", "min"))
        rows = []
        for job_dir in sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)):
            metrics = _read_json(job_dir / "metrics.json")
            overrides_file = job_dir / ".hydra" / "overrides.yaml"
            overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
            status = metrics.get("status", "failed" if not metrics else "unknown")
            rows.append({
                "job": int(job_dir.name),
                "overrides": " ".join(str(o) for o in overrides),
                "status": status,
                metric: metrics.get(metric),
                "error": metrics.get("error"),
                "run_dir": str(job_dir),
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            })

        def key(r):
            v = r[metric]
            bad = v is None or (isinstance(v, float) and math.isnan(v)) or r["status"] != "completed"
            return (bad, (v if mode == "min" else -v) if not bad else 0)

        # the overrides that differ between jobs: what the sweep varied
        common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()
        for r in rows:
            r["params"] = " ".join(o for o in r["overrides"].split() if o not in common)
        rows.sort(key=key)
        failed = [r for r in rows if r["status"] not in ("completed", "dry_run")]
        best = rows[0] if rows and not key(rows[0])[0] else None
        summary = {"sweep_dir": str(sweep_dir), "metric": metric, "mode": mode, "jobs": len(rows),
                   "failed": len(failed), "best": best, "results": rows}
        (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        metric_keys = sorted({k for r in rows for k in r["metrics"]} - {metric})
        with open(sweep_dir / "summary.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["job", "status", metric, "params", *metric_keys, "error", "overrides", "run_dir"])
            for r in rows:
                w.writerow([r["job"], r["status"], r[metric], r["params"], *[r["metrics"].get(k) for k in metric_keys],
                            r["error"] or "", r["overrides"], r["run_dir"]])
        LAST_SWEEP.clear()
        LAST_SWEEP.update(summary)
        _print_table(rows, metric, sweep_dir)
        plot_sweep(rows, metric, sweep_dir / "sweep.png")


def _print_table(rows: list[dict], metric: str, sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep: {sweep_dir} (sorted by {metric})", title_justify="left")
    for col in ("job", "status", metric, "params"):
        table.add_column(col)
    for r in rows:
        v = r[metric]
        shown = f"{v:.4g}" if isinstance(v, (int, float)) else ("-" if v is None else str(v))
        status = r["status"] if r["status"] == "completed" else f"{r['status']}: {(r['error'] or '')[:60]}"
        table.add_row(str(r["job"]), status, shown, r["params"])
    Console(stderr=True).print(table)


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def plot_sweep(rows: list[dict], metric: str, out: Path) -> None:
    """sweep.png: the sweep metric against each key the sweep varied (one panel per key; numeric
    values on a log axis when they span more than a factor of 20, other values as categories)."""
    varied: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        value = r[metric]
        if r["status"] != "completed" or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        for o in r["params"].split():
            key, _, v = o.partition("=")
            varied.setdefault(key.lstrip("+~"), []).append((v, float(value)))
    if not varied:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(varied), figsize=(4.5 * len(varied), 3.4), squeeze=False)
    for ax, (key, points) in zip(axes[0], sorted(varied.items()), strict=True):
        xs = [_number(v) for v, _ in points]
        if all(x is not None for x in xs):
            ax.scatter(xs, [y for _, y in points])
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        else:
            names = sorted({v for v, _ in points})
            ax.scatter([names.index(v) for v, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
