"""bigml finetune: adapt a model to a task (bigml.tasks: classification, multilabel, regression,
token, sft, dpo, ...).

    data (files / folder per class / built-in) --task.read_splits--> train / val / test rows
    tokenizer: model.path's own, or trained on the training texts (model=bert-mini from scratch)
    --task.encode--> tokenized splits
    TaskModel (the task's head, full or LoRA, frozen parts) --Lightning fit, early stopping on
    val_<metric>--> best checkpoint --> val_* / test_* metrics (task.evaluate, as `bigml eval`)
    --> <run>/model (HF, LoRA merged), <run>/adapter (LoRA), <run>/predictions.jsonl, metrics.json

The task decides what is read, how it is encoded and batched, the loss and the metrics; this
recipe is the same for all of them: setup_data, setup_module, setup_trainer, fit, score, export.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping

from bigml.atomic import atomic_directory
from bigml.commands.eval import write_predictions
from bigml.commands.runner import print_summary
from bigml.data import labeled
from bigml.data.tokenizer import load_tokenizer, train_or_load
from bigml.errors import ConfigError, DataError
from bigml.evaluation import check_gate_names, gate_status
from bigml.models import architectures
from bigml.models.loading import read_config, require_weights
from bigml.models.presets import apply_training_defaults
from bigml.models.task_model import TaskModel
from bigml.run_dir import RunDir
from bigml.tasks import Task, get_task, task_names
from bigml.training.checkpoints import checkpoint_callbacks, load_checkpoint, resume_checkpoint
from bigml.training.nonfinite import fit_with_rollback, guard_of
from bigml.training.trainer import build_trainer, trainer_kwargs

log = logging.getLogger("bigml")


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def finetune_task(cfg) -> Task:
    task = get_task(cfg.task.name)
    if not task.finetunable:
        raise ConfigError("task", f"{task.name!r} cannot be finetuned",
                          f"choose one of {', '.join(task_names(lambda t: t.finetunable))}")
    return task.for_config(cfg)  # e.g. classification of images or table rows


def monitor_of(cfg, task: Task) -> tuple[str, str]:
    metric = str(cfg.finetune.early_stopping.get("metric") or cfg.task.get("metric") or task.metric)
    if metric not in task.metrics:
        raise ConfigError("finetune.early_stopping.metric", f"{metric!r} is not a {task.name} metric",
                          f"choose one of {', '.join(sorted(task.metrics))}")
    return metric, task.direction(metric)


@dataclass
class FinetuneData:
    raw: Any                       # the task's raw splits (labeled.RawSplits)
    tokenizer: Any
    hf_config: dict | None         # from-scratch architectures only
    model_config: Any              # the config max_length is checked against
    names: list[str]               # label names (empty for tasks without labels)
    max_length: int
    encoded: dict[str, Any] = field(default_factory=dict)


def tokenizer_and_config(cfg, task: Task, raw):
    """(tokenizer, base config or None, hf config dict for from-scratch or None)."""
    init_path = cfg.model.get("path")
    tok_path = cfg.get("tokenizer", {}).get("path")
    if init_path:
        base = read_config(str(init_path))
        require_weights(str(init_path))
        try:
            tok = load_tokenizer(str(tok_path or init_path), "tokenizer.path" if tok_path else "model.path")
        except DataError as e:
            raise DataError(f"{e}; set tokenizer.path=<the tokenizer the model was trained with>") from None
        if len(tok) > base.vocab_size:
            raise DataError(f"tokenizer: {len(tok)} tokens, but the model has {base.vocab_size} embeddings; "
                            f"use the tokenizer the model was trained with")
        return tok, base, None
    if task.needs_base_model:
        raise ConfigError("model.path", f"task={task.name} starts from a trained model",
                          "set model.path=<a causal LM directory> (e.g. a bigml pretrain run's model/)")
    lm_task = get_task(architectures.pretraining_task_name(cfg.model))
    flat = task.training_texts(raw.train)
    key = hashlib.sha256("\n".join(flat).encode("utf-8", "replace")).hexdigest()[:16]
    tok, cached = train_or_load(cfg.tokenizer, lm_task, key, lambda: iter(flat), str(cfg.cache_dir),
                                model_max_length=int(cfg.model.max_position_embeddings))
    if not cached:
        log.info("tokenizer: trained a %d-token vocabulary on %d training texts", len(tok), len(flat))
    hf = architectures.hf_config_from_cfg(cfg.model, len(tok), lm_task.config_special_ids(tok))
    return tok, None, hf.to_dict()


def class_weights(cfg, task: Task, encoded_train, names: list[str]) -> list[float] | None:
    mode = cfg.finetune.get("class_weights")
    if mode in (None, "none", False):
        return None
    if not getattr(task, "class_weights", False):
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


def stepping_batches(cfg: DictConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the whole run (the schedule's length), computed here rather than by
    Lightning's `estimated_stepping_batches`, which sets up the train loader before a checkpoint
    is restored and so loses the loader's position on resume."""
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    max_steps = int(cfg.trainer.get("max_steps") or -1)
    epochs = cfg.trainer.get("max_epochs")
    total = math.ceil(batches_per_epoch / accumulate) * int(epochs) if epochs not in (None, -1) else max_steps
    return max(min(total, max_steps) if max_steps > 0 else total, 1)


# -- the recipe ------------------------------------------------------------------------------------

def setup_data(cfg, task: Task, raw=None) -> FinetuneData:
    raw = raw if raw is not None else task.read_splits(cfg, int(cfg.seed))  # k-fold passes each fold's rows
    raw.train = task.augment_training(raw.train, cfg)
    prepared = task.preprocessor_and_config(cfg, raw)  # images / tables: no tokenizer
    tokenizer, base_config, hf_config = prepared if prepared is not None else tokenizer_and_config(cfg, task, raw)
    task.prepare_tokenizer(tokenizer, cfg)
    names = raw.label_names
    task.check_training_labels(names, len(raw.train))
    model_config = base_config if base_config is not None else _Cfg(hf_config)
    max_length = labeled.effective_max_length(cfg.data.get("max_length"), tokenizer, model_config)
    data = FinetuneData(raw, tokenizer, hf_config, model_config, names, max_length)
    label2id = {n: i for i, n in enumerate(names)}
    for split in ("train", "val", "test"):
        ds = getattr(raw, split)
        if ds is None or len(ds) == 0:
            continue
        task.check_labels(ds, label2id, f"data ({split} split)", "training")
        data.encoded[split] = task.encode(ds, tokenizer, label2id, max_length, where=f"data ({split} split)",
                                          **task.encode_options(cfg))
    if "val" not in data.encoded:
        raise DataError("data: no validation rows; set data.val_path or data.val_fraction > 0")
    log.info("data: %s train / %d val / %d test rows; %s", f"{len(data.encoded['train']):,}", len(data.encoded["val"]),
             len(data.encoded.get("test", [])), task.describe_labels(names))
    return data


def setup_module(cfg, task: Task, data: FinetuneData) -> TaskModel:
    weights = class_weights(cfg, task, data.encoded["train"], data.names)
    return TaskModel(task=task.name, label_names=data.names, optimizer=_plain(cfg.optimizer),
                     scheduler=_plain(cfg.scheduler), init_path=str(cfg.model.path) if cfg.model.get("path") else None,
                     hf_config=data.hf_config, pad_token_id=data.tokenizer.pad_token_id, method=_plain(cfg.method),
                     freeze_embeddings=bool(cfg.finetune.freeze_embeddings), freeze_layers=int(cfg.finetune.freeze_layers),
                     class_weights=weights,
                     threshold=0.5 if cfg.task.get("threshold") is None else float(cfg.task.threshold),
                     options=task.module_options(cfg))


def setup_trainer(cfg, run_dir: RunDir, task: Task, module: TaskModel, data: FinetuneData, metric: str, mode: str,
                  guard=None):
    train_loader = task.train_loader(data.encoded["train"], data.tokenizer, cfg)
    val_loader = task.eval_loader(data.encoded["val"], data.tokenizer, int(cfg.eval.batch_size))
    ckpts = checkpoint_callbacks(run_dir.checkpoints, int(cfg.checkpoint.get("every_n_steps", 1000)),
                                 int(cfg.checkpoint.get("keep", 1)), monitor=f"val_{metric}", mode=mode)
    stop = EarlyStopping(monitor=f"val_{metric}", mode=mode, patience=int(cfg.finetune.early_stopping.patience))
    _validate_before_max_steps(cfg, len(train_loader))
    module.total_steps = stepping_batches(cfg, len(train_loader))
    trainer, _ = build_trainer(cfg, run_dir.path, callbacks=[*ckpts, stop], flops_per_token=None, model=module.model,
                               guard=guard)
    return trainer, ckpts, train_loader, val_loader


def best_model(module: TaskModel, ckpts, metric: str, lora: bool):
    """The best validation checkpoint's weights, LoRA merged: (plain model, peft model or None)."""
    best = ckpts[1].best_model_path
    if best:
        # mmap: only the weights are read, not the optimizer state the checkpoint also holds
        state = load_checkpoint(best, mmap=True)["state_dict"]
        module.load_state_dict(state)
        log.info("best checkpoint: %s (val_%s %.4g)", best, metric, float(ckpts[1].best_model_score))
    module.eval()
    if lora:
        return module.model.merge_and_unload(), module.model
    return module.model, None


def score(cfg, task: Task, model, data: FinetuneData, module: TaskModel, run_dir: RunDir, is_global_zero: bool) -> dict:
    metrics: dict[str, Any] = {}
    model.float()
    for split in ("val", "test"):
        if split not in data.encoded:
            continue
        report = task.evaluate(model, data.tokenizer, cfg, split, keep_rows=split == "test" and bool(cfg.finetune.predictions),
                               encoded=data.encoded[split], raw_rows=getattr(data.raw, split), module=module)
        metrics.update({f"{split}_{k}": v for k, v in report.metrics.items()})
        if split == "test" and report.rows is not None and is_global_zero:
            write_predictions(run_dir.path / "predictions.jsonl", report.rows)
    return metrics


def export(cfg, task: Task, run_dir: RunDir, model, adapter_model, data: FinetuneData) -> None:
    if adapter_model is not None:
        with atomic_directory(run_dir.path / "adapter", manifest=True) as tmp:
            adapter_model.save_pretrained(str(tmp))
            data.tokenizer.save_pretrained(str(tmp))
    run_dir.export_model(model, data.tokenizer, metadata={
        "command": "finetune", "task": task.name, "method": str(cfg.method.name), "labels": data.names,
        "max_length": data.max_length, "base_model": str(cfg.model.get("path") or cfg.model.get("name")),
        "run_dir": str(run_dir.path), **task.export_metadata(cfg)})


def run(cfg: DictConfig, run_dir: RunDir | None = None, raw=None) -> dict[str, Any]:
    """One finetuning run; k-fold cross-validation (cv.folds) runs it per fold (bigml.crossval),
    passing each fold's directory and rows."""
    if run_dir is None:
        apply_training_defaults(cfg)
        if (cfg.get("cv") or {}).get("folds"):
            from bigml.crossval import cross_validate

            return cross_validate(cfg, run)
    task = finetune_task(cfg)
    metric, mode = monitor_of(cfg, task)
    check_gate_names(cfg.eval, task)
    _, trainer_extra = trainer_kwargs(cfg)
    resuming = bool(cfg.get("resume"))
    run_dir = run_dir or RunDir.open(cfg, resuming=resuming)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    data = setup_data(cfg, task, raw)
    module = setup_module(cfg, task, data)
    task.before_fit(module, data.encoded, data.tokenizer, cfg)
    n_params = architectures.count_params(module.model)
    n_train = architectures.count_params(module.model, trainable_only=True)
    trainer, ckpts, train_loader, val_loader = setup_trainer(cfg, run_dir, task, module, data, metric, mode)
    log.info("model: %s | %s parameters, %s trainable (%.2f%%, %s) | precision %s | run directory: %s",
             cfg.model.get("path") or cfg.model.get("name"), f"{n_params:,}", f"{n_train:,}", 100 * n_train / n_params,
             cfg.method.name, trainer.precision, run_dir.path)
    if cfg.get("dry_run"):
        metrics = {"command": "finetune", "dry_run": True, "task": task.name, "params": n_params,
                   "trainable_params": n_train, "train_examples": len(data.encoded["train"]),
                   "val_examples": len(data.encoded["val"])}
        run_dir.write_metrics(metrics, status="dry_run")
        return metrics

    ckpt_path = resume_checkpoint(cfg.get("resume"), run_dir.path)
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
    module.model.train()  # from_pretrained returns eval mode (dropout off); Lightning keeps submodule modes
    t0 = time.perf_counter()

    def rebuild():  # after a rollback (trainer.on_nonfinite=rollback): a fresh trainer, the same guard
        nonlocal ckpts
        fresh, ckpts, _, _ = setup_trainer(cfg, run_dir, task, module, data, metric, mode, guard=guard_of(trainer))
        return fresh

    trainer = fit_with_rollback(
        trainer, lambda t, ckpt: t.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt),
        str(ckpt_path) if ckpt_path else None, rebuild)
    train_time = time.perf_counter() - t0
    if trainer.interrupted:
        raise KeyboardInterrupt
    model, adapter_model = best_model(module, ckpts, metric, cfg.method.name == "lora")

    metrics: dict[str, Any] = {"command": "finetune", "task": task.name, "method": str(cfg.method.name),
                               "model": str(cfg.model.get("path") or cfg.model.get("name")),
                               "params": n_params, "trainable_params": n_train,
                               "trainable_share": round(n_train / n_params, 6),
                               "labels": data.names, "train_examples": len(data.encoded["train"]),
                               "bad_rows_skipped": int(getattr(data.raw, "bad_rows_skipped", 0)),
                               "train_loss": module.recent_train_loss(), "step": trainer.global_step,
                               "epochs": trainer.current_epoch, "train_time_s": round(train_time, 2),
                               "samples_per_sec": round(module.samples_seen / max(train_time, 1e-9), 2),
                               "trained_tokens_per_sec": round(module.tokens_trained / max(train_time, 1e-9), 2),
                               "early_stopping_metric": f"val_{metric}", "precision": str(trainer.precision),
                               **guard_of(trainer).summary(), "decisions": trainer_extra["decisions"]}
    metrics.update(score(cfg, task, model, data, module, run_dir, trainer.is_global_zero))
    # CI gates on the held-out scores (eval.fail_below.<metric>: test_<metric>, else val_<metric>)
    status, failed = gate_status(metrics, cfg.eval, prefix="test_" if "test" in data.encoded else "val_")
    if trainer.is_global_zero:
        export(cfg, task, run_dir, model, adapter_model, data)
        metrics["model_dir"] = str(run_dir.model_dir)
        run_dir.write_metrics(metrics, status=status)
    if failed is not None:
        raise failed
    if trainer.is_global_zero:
        show = {k: metrics[k] for k in ("task", "method", "model", "params", "trainable_params", "step", "train_loss",
                                       "samples_per_sec") if k in metrics}
        show.update({k: v for k, v in metrics.items() if k.startswith(("val_", "test_")) and k.split("_", 1)[1] in
                     (*task.summary_metrics, "loss", "examples")})
        show["model_dir"] = str(run_dir.model_dir)
        print_summary("bigml finetune", show)
    return metrics


class _Cfg:
    """A dict posing as a transformers config (max_position_embeddings look-ups)."""

    def __init__(self, d: dict | None):
        self.d = d or {}

    def to_dict(self) -> dict:
        return self.d
