"""What happens around every command: logging, the run directory's fate on failure, the summary."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from bigml import run_dir as run_dir_module
from bigml.config_check import check_types
from bigml.errors import StorageError, UsageError
from bigml.help import check_choices
from bigml.run_dir import (
    RunDir,
    close_file_logs,
    discard_if_empty,
    is_global_zero_process,
    quiet_libraries,
    setup_console_logging,
)
from bigml.training.distributed import PeerLost, finish_process_group

log = logging.getLogger("bigml")


def run_job(command: str, fn: Callable[[DictConfig], dict[str, Any]] | str, cfg: DictConfig) -> dict[str, Any]:
    """Run a command's `run(cfg)`; `fn` may be the module name (imported here, after the config is
    checked, so that config errors are reported before torch and transformers are imported)."""
    setup_console_logging()
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir_module.JOB_STARTED = time.time() if multirun else None
    job_started = time.time()
    try:
        check_types(cfg, hydra_cfg.job.config_name)  # before the slow imports: bad values fail in a blink
        check_choices(command, dict(hydra_cfg.runtime.choices), cfg)
        quiet_libraries(verbose=bool(cfg.get("verbose", False)))
        if cfg.get("threads") not in (None, "auto"):  # auto: the command decides (generate measures)
            import torch

            from bigml.decode_speed import parse_threads

            torch.set_num_threads(parse_threads(cfg.threads))  # 0 or text: one line, exit 2
        if isinstance(fn, str):
            import importlib

            fn = importlib.import_module(fn).run
        from bigml.training.preemption import preemption_signals

        with preemption_signals():  # SIGTERM / SIGUSR1: checkpoint at the next step, exit 143
            result = fn(cfg)
        finish_process_group()  # DDP: every process ends together (no-op in a single process)
        return result
    except UsageError as e:
        if multirun and is_global_zero_process():  # a sweep's summary must say why this job failed
            RunDir(out).write_metrics({"command": command, "error": str(e)}, status="failed")
        else:
            discard_if_empty(out)
        raise
    except BaseException as raised:
        # disk full, read-only, a dead DDP peer: one line, not a traceback
        e = StorageError.from_os_error(raised) or PeerLost.from_error(raised) or raised
        # The run keeps what it wrote (checkpoints: resume=...), and says how it ended: "failed",
        # or the error's own status ("diverged", "preempted"). A metrics.json this job wrote itself
        # (a failed gate) stays; one left by an earlier attempt of a resumed run is replaced.
        metrics = out / "metrics.json"
        written_by_this_job = metrics.exists() and metrics.stat().st_mtime >= job_started
        if is_global_zero_process() and (out / ".hydra").is_dir() and not written_by_this_job:
            err = "".join(traceback.format_exception_only(type(e), e)).strip()
            try:
                RunDir(out).write_metrics({"command": command, "error": err}, status=getattr(e, "status", "failed"))
            except OSError as write_error:  # the disk that failed the run (full, read-only) fails this too
                log.error("could not record the failure in %s (%s)", metrics, write_error.strerror or write_error)
        if e is not raised:
            raise e from None
        raise
    finally:
        close_file_logs(out)


def print_summary(title: str, rows: dict[str, Any]) -> None:
    """A two-column table on stderr (rich on a terminal, aligned text elsewhere)."""
    if not is_global_zero_process():
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        if v is None:
            continue
        if isinstance(v, float):
            v = f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        table.add_row(k, str(v))
    console.print(table)
