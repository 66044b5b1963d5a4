"""bigml finetune: adapt a model to a labeled task (classification, multilabel, regression, token).

    labeled data (files / folder per class / built-in) --read_labeled--> train / val / test rows
    tokenizer: model.path's own, or trained on the training texts (model=bert-mini from scratch)
    TaskModel (full or LoRA, frozen parts) --Lightning fit, early stopping on val_<metric>-->
    best checkpoint --> val_* / test_* metrics (bigml.evaluation, the same as `bigml eval`)
    --> <run>/model (HF, LoRA merged), <run>/adapter (LoRA), <run>/predictions.jsonl, metrics.json
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping

from bigml.atomic import atomic_directory
from bigml.commands.eval import write_predictions
from bigml.commands.runner import print_summary
from bigml.data import labeled
from bigml.data.tokenizer import load_tokenizer, train_or_load
from bigml.errors import ConfigError, DataError
from bigml.evaluation import LOWER_IS_BETTER, evaluate_task
from bigml.models import architectures
from bigml.models.task_model import TaskModel
from bigml.run_dir import RunDir
from bigml.training.checkpoints import checkpoint_callbacks
from bigml.training.trainer import build_trainer, trainer_kwargs

log = logging.getLogger("bigml")
METRICS_BY_TASK = {
    "classification": {"accuracy", "f1_macro", "f1_micro", "f1_weighted", "precision_macro", "recall_macro", "ece", "loss"},
    "multilabel": {"accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro", "loss"},
    "regression": {"mse", "rmse", "mae", "r2", "pearson", "spearman", "loss"},
    "token": {"precision", "recall", "f1", "token_accuracy", "loss"},
}


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def monitor_of(cfg) -> tuple[str, str]:
    task = str(cfg.task.name)
    metric = str(cfg.finetune.early_stopping.get("metric") or cfg.task.get("metric") or "loss")
    if metric not in METRICS_BY_TASK[task]:
        raise ConfigError("finetune.early_stopping.metric", f"{metric!r} is not a {task} metric",
                          f"choose one of {', '.join(sorted(METRICS_BY_TASK[task]))}")
    return metric, ("min" if metric in LOWER_IS_BETTER else "max")


def tokenizer_and_config(cfg, raw: labeled.RawSplits):
    """(tokenizer, base config or None, hf config dict for from-scratch or None)."""
    init_path = cfg.model.get("path")
    tok_path = cfg.get("tokenizer", {}).get("path")
    if init_path:
        base = architectures.read_config(str(init_path))
        if not architectures.has_weights(str(init_path)):
            raise DataError(f"model.path={init_path}: no weights (model.safetensors / pytorch_model.bin) in the directory")
        try:
            tok = load_tokenizer(str(tok_path or init_path), "tokenizer.path" if tok_path else "model.path")
        except DataError as e:
            raise DataError(f"{e}; set tokenizer.path=<the tokenizer the model was trained with>") from None
        if len(tok) > base.vocab_size:
            raise DataError(f"tokenizer: {len(tok)} tokens, but the model has {base.vocab_size} embeddings; "
                            f"use the tokenizer the model was trained with")
        return tok, base, None
    arch = str(cfg.model.get("arch"))
    if arch not in architectures.ARCHS:
        raise ConfigError("model.arch", f"unknown architecture {arch!r}", f"choose one of {', '.join(architectures.ARCHS)}")
    objective = architectures.ARCHS[arch][1]
    texts = raw.train["text"]
    flat = [" ".join(t) if isinstance(t, list) else t for t in texts]
    key = hashlib.sha256("\n".join(flat).encode("utf-8", "replace")).hexdigest()[:16]
    tok, cached = train_or_load(cfg.tokenizer, objective, key, lambda: iter(flat), str(cfg.cache_dir),
                                model_max_length=int(cfg.model.max_position_embeddings))
    if not cached:
        log.info("tokenizer: trained a %d-token vocabulary on %d training texts", len(tok), len(flat))
    special = {"pad_token_id": tok.pad_token_id}
    if objective == "causal":
        special.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    hf = architectures.hf_config_from_cfg(cfg.model, len(tok), special)
    return tok, None, hf.to_dict()


def class_weights(cfg, encoded_train, names: list[str]) -> list[float] | None:
    mode = cfg.finetune.get("class_weights")
    if mode in (None, "none", False):
        return None
    if str(cfg.task.name) != "classification":
        raise ConfigError("finetune.class_weights", "only single-label classification uses class weights")
    if mode != "balanced":
        if OmegaConf.is_list(mode) and len(mode) == len(names):
            return [float(x) for x in mode]
        raise ConfigError("finetune.class_weights", f"{mode!r}", f"use balanced, or a list of {len(names)} numbers")
    counts = Counter(encoded_train["labels"])
    n, k = sum(counts.values()), len(names)
    return [n / (k * max(counts.get(i, 0), 1)) for i in range(k)]


def _validate_before_max_steps(cfg: DictConfig, batches_per_epoch: int) -> None:
    """With `trainer.max_steps` shorter than an epoch, a per-epoch validation (val_check_interval
    as a fraction) would never run, leaving early stopping and the best checkpoint without their
    metric: validate at the last step instead."""
    max_steps = int(cfg.trainer.get("max_steps") or -1)
    interval = cfg.trainer.get("val_check_interval", 1.0)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    if max_steps > 0 and isinstance(interval, float) and max_steps * accumulate < interval * batches_per_epoch:
        cfg.trainer.val_check_interval = max_steps * accumulate


def run(cfg: DictConfig) -> dict[str, Any]:
    kind = str(cfg.task.name)
    if kind not in labeled.TASKS:
        raise ConfigError("task", f"{kind!r} cannot be finetuned", f"choose one of {', '.join(labeled.TASKS)}")
    metric, mode = monitor_of(cfg)
    trainer_kwargs(cfg)
    run_dir = RunDir.open(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    raw = labeled.read_labeled(labeled._data_cfg(cfg), kind, int(cfg.seed))
    tokenizer, base_config, hf_config = tokenizer_and_config(cfg, raw)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has no padding or end-of-text token; set tokenizer.path to one that has")
        tokenizer.pad_token = tokenizer.eos_token
    model_config = base_config if base_config is not None else None
    names = raw.label_names
    if kind in ("classification", "multilabel", "token") and len(names) < 2 and kind != "multilabel":
        raise DataError(f"data: the training split has {len(names)} label(s) ({', '.join(names)}); {kind} needs at least 2")
    if kind == "classification" and len(names) > 0.5 * len(raw.train) and all(labeled._is_number(x) for x in names):
        raise DataError(f"data: {len(names)} distinct numeric labels in {len(raw.train)} rows look like a regression "
                        f"target; use task=regression")
    label2id = {n: i for i, n in enumerate(names)}
    max_length = labeled.effective_max_length(cfg.data.get("max_length"), tokenizer,
                                              model_config if model_config is not None else _Cfg(hf_config))
    encoded = {}
    for split in ("train", "val", "test"):
        ds = getattr(raw, split)
        if ds is None or len(ds) == 0:
            continue
        labeled.check_labels(ds, kind, label2id, f"data ({split} split)", "training")
        encoded[split] = labeled.encode(ds, tokenizer, kind, label2id, max_length, where=f"data ({split} split)")
    if "val" not in encoded:
        raise DataError("data: no validation rows; set data.val_path or data.val_fraction > 0")
    log.info("data: %s train / %d val / %d test rows; %s", f"{len(encoded['train']):,}", len(encoded["val"]),
             len(encoded.get("test", [])), f"{len(names)} labels ({', '.join(names[:8])})" if names else "numeric target")

    weights = class_weights(cfg, encoded["train"], names)
    module = TaskModel(kind=kind, label_names=names, optimizer=_plain(cfg.optimizer), scheduler=_plain(cfg.scheduler),
                       init_path=str(cfg.model.path) if cfg.model.get("path") else None, hf_config=hf_config,
                       pad_token_id=tokenizer.pad_token_id, method=_plain(cfg.method),
                       freeze_embeddings=bool(cfg.finetune.freeze_embeddings), freeze_layers=int(cfg.finetune.freeze_layers),
                       class_weights=weights, threshold=float(cfg.task.get("threshold") or 0.5))
    n_params = architectures.count_params(module.model)
    n_train = architectures.count_params(module.model, trainable_only=True)
    bs = int(cfg.data.batch_size)
    train_loader = labeled.make_loader(encoded["train"], tokenizer, kind, bs, shuffle=True,
                                       group_by_length=bool(cfg.data.get("group_by_length", True)), seed=int(cfg.seed),
                                       num_workers=int(cfg.data.get("num_workers") or 0))
    val_loader = labeled.make_loader(encoded["val"], tokenizer, kind, int(cfg.eval.batch_size))
    ckpts = checkpoint_callbacks(run_dir.checkpoints, int(cfg.checkpoint.get("every_n_steps", 1000)),
                                 int(cfg.checkpoint.get("keep", 1)), monitor=f"val_{metric}", mode=mode)
    stop = EarlyStopping(monitor=f"val_{metric}", mode=mode, patience=int(cfg.finetune.early_stopping.patience))
    _validate_before_max_steps(cfg, len(train_loader))
    trainer, meter = build_trainer(cfg, run_dir.path, callbacks=[*ckpts, stop], flops_per_token=None, model=module.model)
    log.info("model: %s | %s parameters, %s trainable (%.2f%%, %s) | precision %s | run directory: %s",
             cfg.model.get("path") or cfg.model.get("name"), f"{n_params:,}", f"{n_train:,}", 100 * n_train / n_params,
             cfg.method.name, trainer.precision, run_dir.path)
    if cfg.get("dry_run"):
        metrics = {"command": "finetune", "dry_run": True, "task": kind, "params": n_params, "trainable_params": n_train,
                   "train_examples": len(encoded["train"]), "val_examples": len(encoded["val"])}
        run_dir.write_metrics(metrics, status="dry_run")
        return metrics

    module.model.train()  # from_pretrained returns eval mode (dropout off); Lightning keeps submodule modes
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    train_time = time.perf_counter() - t0
    if trainer.interrupted:
        raise KeyboardInterrupt
    best = ckpts[1].best_model_path
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
        log.info("best checkpoint: %s (val_%s %.4g)", best, metric, float(ckpts[1].best_model_score))
    module.eval()
    model = module.model.merge_and_unload() if cfg.method.name == "lora" else module.model
    adapter_model = module.model if cfg.method.name == "lora" else None

    metrics: dict[str, Any] = {"command": "finetune", "task": kind, "method": str(cfg.method.name),
                               "model": str(cfg.model.get("path") or cfg.model.get("name")),
                               "params": n_params, "trainable_params": n_train,
                               "trainable_share": round(n_train / n_params, 6),
                               "labels": names, "train_examples": len(encoded["train"]),
                               "train_loss": module.recent_train_loss(), "step": trainer.global_step,
                               "epochs": trainer.current_epoch, "train_time_s": round(train_time, 2),
                               "samples_per_sec": round(module.samples_seen / max(train_time, 1e-9), 2),
                               "early_stopping_metric": f"val_{metric}", "precision": str(trainer.precision)}
    model.float()
    for split in ("val", "test"):
        if split not in encoded:
            continue
        report = evaluate_task(model, tokenizer, cfg, kind, split, keep_rows=split == "test" and bool(cfg.finetune.predictions),
                               encoded=encoded[split], raw_rows=getattr(raw, split))
        metrics.update({f"{split}_{k}": v for k, v in report.metrics.items()})
        if split == "test" and report.rows is not None and trainer.is_global_zero:
            write_predictions(run_dir.path / "predictions.jsonl", report.rows)
    if trainer.is_global_zero:
        if adapter_model is not None:
            with atomic_directory(run_dir.path / "adapter") as tmp:
                adapter_model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
        run_dir.export_model(model, tokenizer, metadata={
            "command": "finetune", "task": kind, "method": str(cfg.method.name), "labels": names,
            "max_length": max_length, "run_dir": str(run_dir.path)})
        metrics["model_dir"] = str(run_dir.model_dir)
        run_dir.write_metrics(metrics)
        show = {k: metrics[k] for k in ("task", "method", "model", "params", "trainable_params", "step", "train_loss",
                                       "samples_per_sec") if k in metrics}
        show.update({k: v for k, v in metrics.items() if k.startswith(("val_", "test_")) and k.split("_", 1)[1] in
                     ("accuracy", "f1_macro", "f1", "mse", "mae", "r2", "loss")})
        show["model_dir"] = str(run_dir.model_dir)
        print_summary("bigml finetune", show)
    return metrics


class _Cfg:
    """A dict posing as a transformers config (max_position_embeddings look-ups)."""

    def __init__(self, d: dict | None):
        self.d = d or {}

    def to_dict(self) -> dict:
        return self.d

