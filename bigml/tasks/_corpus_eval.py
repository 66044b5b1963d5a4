"""Scoring a language model on a text corpus: loss, perplexity, bits per byte (+ masked accuracy).

The corpus is packed exactly as pretraining packs it (same cache); `eval.split` picks the training
part, the held-out tail (val / test) or all of it.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanMetric

from bigml.errors import ConfigError, DataError


def evaluate(task, model, tokenizer, cfg) -> dict[str, float]:
    from bigml.data import sources
    from bigml.data.labeled import model_max_length
    from bigml.data.packed import PackedBlocks, pack_corpus
    from bigml.tasks._scoring import scoring_batches

    if cfg.data.get("kind") != "corpus":
        raise ConfigError("data", f"a {task.name.replace('_', ' ')} model is scored on a text corpus, not labeled data",
                          "use data=text data.path=<text files> (or data=python-stdlib)")
    task.check_tokenizer(tokenizer, "the tokenizer")
    files = sources.corpus_files(cfg.data)
    key = sources.fingerprint(cfg.data, files)
    block = int(cfg.eval.get("max_length") or cfg.data.get("block_size") or 128)
    limit = model_max_length(tokenizer, model.config)
    if limit and block > limit:
        block = limit
    info, _ = pack_corpus(cfg.data, tokenizer, task, lambda: sources.load_documents(cfg.data, files), key,
                          str(cfg.cache_dir), int(cfg.get("seed", 0)), float(cfg.data.get("val_fraction") or 0.05))
    split = str(cfg.eval.get("split") or "auto")
    start, end = (0, info.n_train) if split == "train" else (info.n_train, info.n_tokens) if split in ("val", "test") \
        else (0, info.n_tokens)
    blocks = PackedBlocks(info, start, end, block)
    if len(blocks) == 0:
        raise DataError(f"data: the corpus has fewer than {block} tokens; lower eval.max_length")
    loader = torch.utils.data.DataLoader(blocks, batch_size=int(cfg.eval.get("batch_size") or 32), shuffle=False)
    device = next(model.parameters()).device
    loss_m, acc_m = MeanMetric(), MeanMetric()
    options = dict(seed=int(cfg.get("seed", 0)), mask_token_id=tokenizer.mask_token_id,
                   special_ids=torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long, device=device),
                   probability=float(cfg.eval.get("mlm_probability") or 0.15),
                   cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    targets = 0
    model.eval()
    with torch.no_grad():
        for i, ids in enumerate(scoring_batches(loader, model, cfg)):
            loss, n, hits = task.score_block(model, ids, i, **options)
            if hits is not None:
                acc_m.update(hits.mean().cpu(), weight=n)
            loss_m.update(loss.cpu(), weight=n)
            targets += n
    loss = float(loss_m.compute())
    tokens_per_byte = info.n_tokens / max(info.n_bytes, 1)
    out = {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50)), 6),
           "bits_per_byte": round(loss * tokens_per_byte / math.log(2), 6), "tokens": targets}
    if task.accuracy_reported():
        out["accuracy"] = round(float(acc_m.compute()), 6)
    return out
