"""Checkpoints: what to save, where a resumed run picks up.

    checkpoints/step-000100.ckpt   every checkpoint.every_n_steps (newest checkpoint.keep kept)
    checkpoints/last.ckpt          the newest state, rewritten with each save and at the end
    checkpoints/best.ckpt          lowest validation loss so far

Every file is written atomically with a checksum beside it (`last.ckpt.sha256`, bigml.atomic), so
after a SIGKILL the newest complete checkpoint is intact and `resume=auto` continues from it, and
a checkpoint damaged later is detected and skipped for the previous good one.

Loading is safe for files from anyone: `load_checkpoint` is the one place checkpoints are read,
always with torch's `weights_only=True` (tensors, numbers, strings, containers; no code runs).
bigml's own checkpoints contain nothing else; those of older bigml versions held numpy RNG arrays,
which are allowed by name (numpy's array reconstruction runs no user code).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from bigml.atomic import CorruptFile, atomic_write_stream, remove_with_checksum, verify_file
from bigml.errors import UsageError
from bigml.run_dir import latest_resumable_run, output_root

log = logging.getLogger("bigml")


def checkpoint_callbacks(dirpath: Path, every_n_steps: int, keep: int, monitor: str = "val_loss",
                         mode: str = "min") -> list[ModelCheckpoint]:
    periodic = ModelCheckpoint(
        dirpath=dirpath, filename="step-{step:06d}", auto_insert_metric_name=False,
        every_n_train_steps=max(int(every_n_steps), 1), save_top_k=max(int(keep), 1),
        monitor="step", mode="max", save_last=True, enable_version_counter=False,
    )
    best = ModelCheckpoint(
        dirpath=dirpath, filename="best", auto_insert_metric_name=False, monitor=monitor, mode=mode,
        save_top_k=1, enable_version_counter=False,
    )
    return [periodic, best]


def _step_of(p: Path) -> int:
    m = re.search(r"step-(\d+)", p.name)
    return int(m.group(1)) if m else -1


def pick_checkpoint(run_dir: Path) -> Path | None:
    """The newest loadable checkpoint of a run: last.ckpt, else the highest step-*.ckpt."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return None
    candidates = []
    if (ckpts / "last.ckpt").exists():
        candidates.append(ckpts / "last.ckpt")
    candidates += sorted(ckpts.glob("step-*.ckpt"), key=_step_of, reverse=True)
    for c in candidates:
        if c.is_dir():  # a sharded (FSDP) checkpoint: a directory written by torch.distributed.checkpoint
            if (c / ".metadata").exists():
                return c
            continue
        try:
            load_checkpoint(c, mmap=True)
            return c
        except CorruptFile as e:  # damaged on disk, truncated by a non-atomic writer, or not a checkpoint
            log.warning("skipping checkpoint %s (%s); using an earlier one", c, str(e).split(": ", 1)[-1])
    return None


def _numpy_globals() -> list:
    """What torch.load needs to rebuild numpy arrays (RNG states in checkpoints of bigml <= 0.x)."""
    import numpy as np

    allowed = [np.ndarray, np.dtype, type(np.dtype("uint32")), type(np.dtype("float64"))]
    for mod, name in (("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")):
        try:
            allowed.append(getattr(__import__(mod, fromlist=[name]), name))
            break
        except (ImportError, AttributeError):
            continue
    return allowed


def load_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """A checkpoint's contents, read safely (weights_only), after checking its checksum.
    CorruptFile (one line naming the file) when it is damaged, truncated or holds Python objects."""
    path = Path(path)
    verify_file(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except pickle_errors() as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CorruptFile(path, "holds Python objects besides tensors, which bigml does not load "
                                    "(loading them could run code)",
                              "load it yourself with torch.load(weights_only=False) only if you trust its source") from None
        raise CorruptFile(path, f"not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def pickle_errors() -> tuple[type[BaseException], ...]:
    import pickle
    import zipfile

    return (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError,
            AttributeError, TypeError, IndexError)


def resolve_resume_dir(value: str, command: str, root: str | None = None) -> Path | None:
    """The run directory a `resume=` value refers to; None for `auto` with nothing to resume."""
    if value == "auto":
        root_dir = Path(root) if root else output_root()
        found = latest_resumable_run(root_dir, command)
        if found is None:
            log.info("resume=auto: no unfinished %s run with a checkpoint under %s; starting a new run",
                     command, root_dir)
        return found
    p = Path(value).expanduser()
    if p.is_file() and p.suffix == ".ckpt":
        return p.parent.parent if p.parent.name == "checkpoints" else p.parent
    if p.is_dir():
        if pick_checkpoint(p) is None:
            if not _killed_before_first_checkpoint(p):
                raise UsageError(f"resume={value}: no readable checkpoint in {p / 'checkpoints'}")
            log.warning("resume=%s: the run stopped before its first complete checkpoint; training starts again "
                        "from step 0 in the same directory", value)
        return p
    raise UsageError(f"resume={value}: no such run directory or checkpoint file; use resume=auto or a run directory")


def resume_checkpoint(value: str | None, run_dir: Path) -> Path | None:
    """The checkpoint file to restore for `resume=value` once running in `run_dir`."""
    if not value:
        return None
    p = Path(str(value)).expanduser()
    if p.is_file() and p.suffix == ".ckpt":
        return p
    ckpt = pick_checkpoint(run_dir)
    if ckpt is None and value != "auto" and not _killed_before_first_checkpoint(run_dir):
        raise UsageError(f"resume={value}: no readable checkpoint in {run_dir / 'checkpoints'}")
    return ckpt


def _killed_before_first_checkpoint(run_dir: Path) -> bool:
    """A run directory bigml started (Hydra's .hydra/ is written first) that never finished and holds
    no checkpoint: killed before its first one completed. Resuming it means starting over in it;
    any other directory without checkpoints is a wrong path."""
    import json

    if not (run_dir / ".hydra" / "config.yaml").is_file():
        return False
    try:
        status = json.loads((run_dir / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        status = None
    return status != "completed"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer and reader: atomic, checksummed writes on local disks; safe,
    verified reads (`load_checkpoint`).

    Lightning's own `_atomic_save` goes through an fsspec transaction, whose local implementation
    writes to the system temp dir and then `shutil.move`s the file; across filesystems that is a copy
    into the destination, so a kill during the copy leaves a truncated checkpoint. Remote URLs
    (s3://, gs://) keep Lightning's path.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write_stream(path, lambda f: torch.save(checkpoint, f), checksum=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")

    def remove_checkpoint(self, path) -> None:
        if "://" in str(path):
            return super().remove_checkpoint(path)
        remove_with_checksum(path)
