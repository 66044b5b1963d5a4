"""Exact resume: the random-number streams travel in every checkpoint.

A LightningModule that mixes this in saves torch's (CPU and CUDA), numpy's and Python's RNG states
with each checkpoint and restores them when training starts again, so dropout, masking and
anything else random continue exactly as in an uninterrupted run (on CPU with a fixed seed the
final metrics are equal). The data loaders' positions are saved by the loaders themselves
(bigml.data.packed.ResumableLoader, bigml.data.labeled.ResumableBatches).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


class ExactResume:
    _pending_rng: dict | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("bigml", {})["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": _numpy_state_plain(np.random.get_state()),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_rng = checkpoint.get("bigml", {}).get("rng")

    def on_train_start(self) -> None:
        # Restored here, not in on_load_checkpoint, so nothing that runs in between (dataloader
        # set-up, sanity validation) can consume random numbers.
        rng, self._pending_rng = self._pending_rng, None
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            np.random.set_state(_numpy_state_from_plain(rng["numpy"]))
            random.setstate(rng["python"])


def _numpy_state_plain(state: tuple) -> tuple:
    """numpy's RNG state with its key array as a tensor: checkpoints then hold only what
    torch.load(weights_only=True) reads (bigml.training.checkpoints loads nothing else)."""
    name, keys, pos, has_gauss, cached = state
    return (str(name), torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)), int(pos), int(has_gauss),
            float(cached))


def _numpy_state_from_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    return (name, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached))
