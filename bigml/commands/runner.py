"""What happens around every command: logging, the run directory's fate on failure, the summary."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bigml.config_check import check_types
from bigml.errors import UsageError
from bigml.run_dir import RunDir, close_file_logs, discard_if_empty, is_global_zero_process, setup_console_logging

log = logging.getLogger("bigml")


def run_job(command: str, fn: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> dict[str, Any]:
    setup_console_logging(verbose=bool(cfg.get("verbose", False)))
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    try:
        check_types(cfg, hydra_cfg.job.config_name)
        return fn(cfg)
    except UsageError:
        discard_if_empty(out)
        raise
    except BaseException as e:
        # The run keeps what it wrote (checkpoints: resume=...), and says that it failed.
        metrics = out / "metrics.json"
        if is_global_zero_process() and (out / ".hydra").is_dir() and not metrics.exists():
            err = "".join(traceback.format_exception_only(type(e), e)).strip()
            RunDir(out).write_metrics({"command": command, "error": err}, status="failed")
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
