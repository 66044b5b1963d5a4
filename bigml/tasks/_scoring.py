"""The loop every task's scoring shares."""

from __future__ import annotations

import torch

from bigml.progress import track


def scoring_batches(loader, model, cfg, description: str = "scoring"):
    """The batches of an evaluation loader on the model's device, at most eval.max_batches of them,
    with progress: the loop every task's scoring shares."""

    try:
        device = next(p.device for p in model.parameters())
    except StopIteration:
        device = torch.device("cpu")
    limit = cfg.eval.get("max_batches")
    total = min(len(loader), int(limit)) if limit is not None else len(loader)
    for i, batch in enumerate(track(loader, description, total=total, unit="batches")):
        if i >= total:
            break
        yield {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)
