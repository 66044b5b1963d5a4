"""Scoring a labeled-text model on a split of labeled data (shared by every LabeledTask)."""

from __future__ import annotations

from typing import Any

import torch

from bigml.tasks._report import Report
from bigml.tasks._scoring import scoring_batches


def resolve_split(cfg, raw) -> str:
    """eval.split=auto: data.test_path if set, else all of data.path (a built-in dataset: its carved
    test split)."""
    split = str(cfg.eval.get("split") or "auto")
    if split != "auto":
        return split
    if cfg.data.get("test_path"):
        return "test"
    return "all" if raw is not None and raw.all is not None else "test"


def encode_for_eval(task, model, tokenizer, cfg, split: str):
    """(encoded split, its raw rows, label names in the model's order) of cfg.data for scoring."""
    from bigml.data import labeled

    names = task.model_label_names(model.config)
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
    return task.encode(ds, tokenizer, label2id, max_length, where=f"data ({split} split)"), ds, names


def evaluate(task, model, tokenizer, cfg, split: str = "test", keep_rows: bool = False, encoded=None,
             raw_rows=None, keep_outputs: bool = False, **_) -> Report:
    names = task.model_label_names(model.config)
    if encoded is None:
        encoded, raw_rows, names = task.encode_for_eval(model, tokenizer, cfg, split)
    loader = task.eval_loader(encoded, tokenizer, int(cfg.eval.get("batch_size") or 32))
    threshold = (cfg.get("task") or {}).get("threshold")
    threshold = 0.5 if threshold is None else float(threshold)  # 0.0 is a threshold too
    scorer = task.scorer(names, int(cfg.eval.get("ece_bins") or 15), threshold)
    rows: list[dict[str, Any]] | None = [] if keep_rows else None
    outputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in scoring_batches(loader, model, cfg):
            logits = task.forward_logits(model, batch)
            preds = scorer.update(logits, batch["labels"])
            if keep_outputs:
                outputs.append(logits.float().cpu())
                targets.append(batch["labels"].cpu())
            if rows is not None:
                rows.extend(task.prediction_rows(logits.float().cpu(), preds, batch["labels"].cpu(), names))
    if was_training:
        model.train()
    if rows is not None and raw_rows is not None:
        rows = [{**first, **r} for first, r in zip(task.row_inputs(raw_rows), rows, strict=False)]
    conf = scorer.confusion()
    report = Report(task.name, scorer.compute(), names, scorer.per_class(), conf.tolist() if conf is not None else None,
                    rows)
    if keep_outputs and outputs:
        report.outputs, report.targets = torch.cat(outputs), torch.cat(targets)
    return report
