"""The run directory: the one contract between bigml commands.

    <run>/.hydra/config.yaml     the resolved config (repeat a run: bigml <command> --config-dir ...)
    <run>/.hydra/overrides.yaml  the command-line overrides
    <run>/bigml.log              the log
    <run>/metrics.json           stable keys for scripts; "status": "completed" | "failed"
    <run>/checkpoints/           Lightning checkpoints: step-*.ckpt, last.ckpt, best.ckpt (resume)
    <run>/model/                 Hugging Face format: config.json, model.safetensors, tokenizer files

metrics.json and model/ are written atomically at the very end, so a directory holding a
metrics.json with status "completed" is a finished run, and nothing else is.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bigml import __version__
from bigml.atomic import atomic_directory, atomic_write_json, remove_stale_temporaries
from bigml.errors import UsageError
from bigml.ranks import is_global_zero_process  # noqa: F401 - part of this module's API

log = logging.getLogger("bigml")
JOB_STARTED: float | None = None  # set by the runner for sweep jobs (many runs in one process)
_LOG_FORMAT = "%(asctime)s %(levelname).1s %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it is swapped by test harnesses, notebooks)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_console_logging() -> None:
    """Logs go to stderr (stdout is for results, e.g. generated text)."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    root.setLevel(logging.INFO if is_global_zero_process() else logging.WARNING)  # one voice under DDP


def quiet_libraries(verbose: bool = False) -> None:
    """Library chatter (Lightning's tips, transformers' notices, deprecation warnings) is for their
    maintainers, not for people running bigml; verbose=true shows it."""
    import warnings

    import transformers

    quiet = logging.INFO if verbose else logging.WARNING
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "datasets", "torch", "httpx"):
        logging.getLogger(name).setLevel(quiet)
    transformers.utils.logging.set_verbosity_info() if verbose else transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*(LeafSpec|does not have many workers|is deprecated|exists and is not empty|It is recommended to use `self.log).*")


def holds_run(path: Path) -> bool:
    return any((path / name).exists() for name in ("metrics.json", "checkpoints", "model"))


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.model_dir = path / "model"
        self.metrics_path = path / "metrics.json"
        # the whole command, start-up included; a sweep job counts from its own start
        self.started = JOB_STARTED or psutil.Process().create_time()
        self._created_files = False

    @classmethod
    def open(cls, cfg: DictConfig, resuming: bool = False) -> RunDir:
        """The current Hydra job's directory, checked so that no existing run is overwritten."""
        path = Path(HydraConfig.get().runtime.output_dir)
        run = cls(path)
        check_inside_output_root(cfg, path)
        if not is_global_zero_process():
            return run
        if holds_run(path) and not resuming:
            raise UsageError(
                f"{path} already holds a run; pass resume={path} to continue it, "
                f"or choose another directory with hydra.run.dir=..."
            )
        try:
            (path / ".hydra").mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UsageError(f"{path}: cannot write the run directory ({e.strerror}); "
                             f"set BIGML_OUTPUT_ROOT or hydra.run.dir to a writable place") from None
        run._write_config(cfg)
        if resuming:  # what a killed writer left in this run: temporary checkpoint files, a half export
            remove_stale_temporaries(run.checkpoints)
            remove_stale_temporaries(path, "model")
        handler = logging.FileHandler(path / "bigml.log")
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        return run

    def _write_config(self, cfg: DictConfig) -> None:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        (self.path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        overrides = list(HydraConfig.get().overrides.task)
        (self.path / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))

    def write_metrics(self, metrics: dict[str, Any], status: str = "completed") -> None:
        if not is_global_zero_process():
            return
        payload = {**metrics, "status": status, "bigml_version": __version__}
        payload.setdefault("wall_time_s", round(time.time() - self.started, 2))
        atomic_write_json(self.metrics_path, payload)
        if self.model_dir.is_dir():  # the model card shows the metrics
            from bigml.model_card import write_card

            write_card(self.model_dir, metrics=payload, run_dir=self.path)

    def export_model(self, model, tokenizer, metadata: dict[str, Any], state_dict: dict | None = None) -> Path:
        """save_pretrained (safetensors) + tokenizer + bigml.json, all in one atomic rename.
        `state_dict` overrides the model's own tensors (e.g. weights gathered from FSDP shards)."""
        with atomic_directory(self.model_dir, manifest=True) as tmp:  # SHA256SUMS: checked when loaded
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            (tmp / "bigml.json").write_text(json.dumps({**metadata, "bigml_version": __version__}, indent=2, default=str))
            from bigml.model_card import write_card

            write_card(tmp, run_dir=self.path, location=self.model_dir)
        return self.model_dir

    def discard_if_empty(self) -> None:
        discard_if_empty(self.path)


def is_inside(path: Path, root: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(root)))


def check_inside_output_root(cfg: DictConfig, path: Path) -> None:
    """A run directory built from config values (the command name, a time stamp, a sweep job
    number) lies under output_root; only an explicit hydra.run.dir / hydra.sweep.dir on the command
    line may point elsewhere. A config from someone else cannot make bigml write outside the root."""
    overrides = [str(o) for o in HydraConfig.get().overrides.hydra]
    if any(o.split("=", 1)[0].lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") for o in overrides):
        return
    root = Path(str(cfg.get("output_root") or output_root())).expanduser()
    if not is_inside(path, root):
        raise UsageError(f"the run directory {path} is outside output_root={root} (a config value such as a run "
                         f"name leads out of it); pass hydra.run.dir=... on the command line to choose a place yourself")


def check_path_component(key: str, value) -> None:
    """A config value used as one directory name inside the run (a logger's name or version)."""
    text = str(value)
    if text in ("..", ".") or "/" in text or "\\" in text or "\x00" in text:
        raise UsageError(f"{key}={text}: must be a plain name, not a path (it names a directory inside the run)")


def close_file_logs(path: Path) -> None:
    """Detach the log file of the run in `path` (several runs can share one process: sweeps, tests)."""
    for h in list(logging.getLogger().handlers):
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == path:
            logging.getLogger().removeHandler(h)
            h.close()


def discard_if_empty(path: Path) -> None:
    """After a usage error: remove what bigml wrote (config, log) and the directory if then empty.

    Only bigml's own files are deleted, never the directory tree, so a run directory pointed at an
    existing folder (hydra.run.dir=.) is safe.
    """
    if not is_global_zero_process() or holds_run(path) or not path.is_dir():
        return
    close_file_logs(path)
    for f in (path / ".hydra" / "config.yaml", path / ".hydra" / "overrides.yaml", path / "bigml.log"):
        f.unlink(missing_ok=True)
    for d in (path / ".hydra", path):
        try:
            d.rmdir()
        except OSError:
            pass


def latest_resumable_run(root: Path, command: str) -> Path | None:
    """The newest run of `command` under `root` that has a checkpoint and did not complete."""
    candidates = []
    for d in (root / command).glob("*"):
        if not (d / "checkpoints").is_dir() or not any((d / "checkpoints").glob("*.ckpt")):
            continue
        status = None
        if (d / "metrics.json").exists():
            try:
                status = json.loads((d / "metrics.json").read_text()).get("status")
            except ValueError:
                status = None
        if status != "completed":
            candidates.append(d)
    return max(candidates, key=lambda d: d.stat().st_mtime) if candidates else None


def output_root() -> Path:
    return Path(os.environ.get("BIGML_OUTPUT_ROOT", "runs"))
