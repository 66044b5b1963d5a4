"""Scoring a labeled-text model on a split of labeled data (shared by every LabeledTask)."""

from __future__ import annotations

from typing import Any

import torch

from bigml.tasks._report import Report


def resolve_split(cfg, raw) -> str:
    """eval.split=auto: data.test_path if set, else all of data.path (a built-in dataset: its carved
    test split)."""
    split = str(cfg.eval.get("split") or "auto")
    if split != "auto":
        return split
    if cfg.data.get("test_path"):
        return "test"
    return "all" if raw is not None and raw.all is not None else "test"


def evaluate(task, model, tokenizer, cfg, split: str = "test", keep_rows: bool = False, encoded=None,
             raw_rows=None, **_) -> Report:
    from bigml.data import labeled
    from bigml.tasks._scoring import scoring_batches

    names = task.model_label_names(model.config)
    if encoded is None:
        raw = labeled.read_labeled(labeled.data_cfg_of(cfg), task, int(cfg.get("seed", 0)), need_train=False)
        if split == "auto":
            split = resolve_split(cfg, raw)
        ds = raw.get(split)
        task.check_eval_labels(ds, names, f"data ({split} split)")
        label2id = task.label_map_for_model(names, model.config)
        if label2id and set(label2id) != set(names):  # LABEL_i defaults: index labels by integer value
            names = [k for k, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
        task.check_labels(ds, label2id, f"data ({split} split)", "the model's labels")
        max_length = labeled.effective_max_length(cfg.eval.get("max_length") or cfg.data.get("max_length"), tokenizer,
                                                  model.config)
        encoded = task.encode(ds, tokenizer, label2id, max_length, where=f"data ({split} split)")
        raw_rows = ds
    loader = labeled.make_loader(encoded, task.collate_fn(tokenizer), int(cfg.eval.get("batch_size") or 32))
    threshold = (cfg.get("task") or {}).get("threshold")
    threshold = 0.5 if threshold is None else float(threshold)  # 0.0 is a threshold too
    scorer = task.scorer(names, int(cfg.eval.get("ece_bins") or 15), threshold)
    rows: list[dict[str, Any]] | None = [] if keep_rows else None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in scoring_batches(loader, model, cfg):
            logits = task.forward_logits(model, batch)
            preds = scorer.update(logits, batch["labels"])
            if rows is not None:
                rows.extend(task.prediction_rows(logits.float().cpu(), preds, batch["labels"].cpu(), names))
    if was_training:
        model.train()
    if rows is not None and raw_rows is not None:
        for r, text in zip(rows, raw_rows["text"], strict=False):
            r["text"] = " ".join(text) if isinstance(text, list) else text
        rows = [{"text": r.pop("text"), **r} for r in rows]
    conf = scorer.confusion()
    return Report(task.name, scorer.compute(), names, scorer.per_class(), conf.tolist() if conf is not None else None, rows)
