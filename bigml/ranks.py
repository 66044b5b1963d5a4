"""Which process speaks: rank 0 logs and writes; the others stay quiet."""

from __future__ import annotations

import os


def is_global_zero_process() -> bool:
    """True in the process that owns the run directory (rank 0, before or without any launcher)."""
    if "RANK" in os.environ:  # torchrun
        return os.environ["RANK"] == "0"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:  # srun, one task per device
        return os.environ["SLURM_PROCID"] == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
