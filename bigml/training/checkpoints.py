"""Checkpoints: what to save, where a resumed run picks up.

    checkpoints/step-000100.ckpt   every checkpoint.every_n_steps (newest checkpoint.keep kept)
    checkpoints/last.ckpt          the newest state, rewritten with each save and at the end
    checkpoints/best.ckpt          lowest validation loss so far

Every file is written atomically (bigml.atomic.AtomicCheckpointIO), so after a SIGKILL the newest
complete checkpoint is intact and `resume=auto` continues from it.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from bigml.atomic import atomic_write_bytes
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
            torch.load(c, map_location="cpu", weights_only=False, mmap=True)
            return c
        except Exception as e:  # truncated by a crash in a non-atomic writer, or an old format
            log.warning("skipping unreadable checkpoint %s (%s)", c, type(e).__name__)
    return None


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
            raise UsageError(f"resume={value}: no readable checkpoint in {p / 'checkpoints'}")
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
    if ckpt is None and value != "auto":
        raise UsageError(f"resume={value}: no readable checkpoint in {run_dir / 'checkpoints'}")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local disks.

    Lightning's own `_atomic_save` goes through an fsspec transaction, whose local implementation
    writes to the system temp dir and then `shutil.move`s the file; across filesystems that is a copy
    into the destination, so a kill during the copy leaves a truncated checkpoint. Remote URLs
    (s3://, gs://) keep Lightning's path.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())
