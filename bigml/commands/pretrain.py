"""bigml pretrain: train a language model on a text corpus and export it in Hugging Face format.

    corpus files --(tokenizer: trained+cached, or given)--> packed token memmap (cached)
    model config (conf/model or model.path) --> LanguageModel --> Lightning Trainer.fit
    --> <run>/model (HF format), <run>/metrics.json, <run>/checkpoints
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, open_dict

from bigml import hardware
from bigml.commands.runner import print_summary
from bigml.data import sources
from bigml.data.packed import PackedCorpusDataModule, pack_corpus
from bigml.data.tokenizer import load_tokenizer, train_or_load
from bigml.errors import ConfigError, DataError
from bigml.models import architectures
from bigml.models.language_model import LanguageModel
from bigml.models.loading import read_config
from bigml.models.presets import apply_training_defaults
from bigml.run_dir import RunDir
from bigml.tasks import get_task, language_model_task
from bigml.training.checkpoints import checkpoint_callbacks, resume_checkpoint
from bigml.training.nonfinite import fit_with_rollback, guard_of
from bigml.training.trainer import build_trainer, full_state_dict, overfit_batches, replicas_identical, trainer_kwargs

log = logging.getLogger("bigml")


def _max_positions(config) -> int | None:
    d = config.to_dict()
    return d.get("max_position_embeddings") or d.get("n_positions")


def prepare(cfg: DictConfig):
    """Everything before training: the task (causal_lm / masked_lm), tokenizer, packed corpus,
    model config. No side effects beyond the caches, so `dry_run=true` and tests can call it."""
    block = int(cfg.data.block_size)
    if block < 2:
        raise ConfigError("data.block_size", f"{block} is too small", "use at least 2 tokens")
    if int(cfg.data.batch_size) < 1:
        raise ConfigError("data.batch_size", f"{cfg.data.batch_size} must be at least 1")
    init_path = cfg.model.get("path")
    base_config = read_config(str(init_path)) if init_path else None
    task = language_model_task(base_config) if base_config else get_task(architectures.pretraining_task_name(cfg.model))
    task = task.for_objective(cfg.get("objective"))  # objective=mlm+nsp: masked LM + next-sentence prediction
    # recurrent models (model=lstm) have no position limit: no max_position_embeddings
    max_pos = _max_positions(base_config) if base_config else int(cfg.model.get("max_position_embeddings") or 0) or None
    if max_pos and block > max_pos:
        raise ConfigError("data.block_size", f"{block} exceeds the model's {max_pos} positions",
                          "lower data.block_size or raise model.max_position_embeddings")

    files = sources.corpus_files(cfg.data)
    corpus_key = sources.fingerprint(cfg.data, files)
    _docs = {}

    def documents():
        if "ds" not in _docs:
            _docs["ds"] = sources.load_documents(cfg.data, files)
        return _docs["ds"]

    # tokenizer: explicit path > the model directory's own > trained on this corpus (cached)
    tok_path = cfg.tokenizer.get("path") or (str(init_path) if init_path else None)
    if tok_path:
        tokenizer = load_tokenizer(str(tok_path), "tokenizer.path" if cfg.tokenizer.get("path") else "model.path")
        tok_cached = True
    else:
        tokenizer, tok_cached = train_or_load(cfg.tokenizer, task, corpus_key, lambda: _iter_docs(documents()),
                                              str(cfg.cache_dir), model_max_length=max_pos or block)
    task.check_tokenizer(tokenizer, f"tokenizer {tok_path}")
    if base_config is not None and len(tokenizer) > base_config.vocab_size:
        raise DataError(f"tokenizer {tok_path}: {len(tokenizer)} tokens, but the model at model.path has "
                        f"{base_config.vocab_size} embeddings; use the tokenizer the model was trained with")

    t0 = time.perf_counter()
    info, corpus_cached = pack_corpus(cfg.data, tokenizer, task, documents, corpus_key, str(cfg.cache_dir),
                                      int(cfg.seed), float(cfg.data.val_fraction))
    log.info("corpus: %s documents, %s tokens (%s)%s", f"{info.n_documents:,}", f"{info.n_tokens:,}",
             "cached" if corpus_cached else f"tokenized in {time.perf_counter() - t0:.1f}s",
             "" if tok_cached else "; tokenizer trained")

    if base_config is None:
        hf_config = architectures.hf_config_from_cfg(cfg.model, len(tokenizer), task.config_special_ids(tokenizer))
    else:
        hf_config = base_config
    return task, tokenizer, info, hf_config


def _iter_docs(ds):
    for batch in ds.iter(batch_size=1000):
        yield from batch["text"]


def run(cfg: DictConfig) -> dict[str, Any]:
    apply_training_defaults(cfg)
    if not cfg.model.get("path"):
        task = get_task(architectures.pretraining_task_name(cfg.model))
        if not task.language_model:  # model=dcgan: the task brings its own recipe (bigml.adversarial)
            return task.pretrain(cfg)
    resuming = bool(cfg.get("resume"))
    _, extra = trainer_kwargs(cfg)  # validate the trainer settings before any slow work
    run_dir = RunDir.open(cfg, resuming=resuming)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    task, tokenizer, info, hf_config = prepare(cfg)
    if resuming and cfg.logger.get("version") is not None:
        # A resumed run logs into a new version folder: CSV/TensorBoard writers would otherwise
        # replace the interrupted run's history.
        with open_dict(cfg):
            cfg.logger.version = f"resumed-{time.strftime('%Y%m%d-%H%M%S')}"
    init_path = cfg.model.get("path")
    special_ids = sorted(set(tokenizer.all_special_ids))
    module = LanguageModel(
        hf_config=hf_config.to_dict(), task=task.name,
        optimizer=_plain(cfg.optimizer), scheduler=_plain(cfg.scheduler),
        init_path=str(init_path) if init_path else None, mlm_probability=float(cfg.mlm_probability),
        special_ids=special_ids, mask_token_id=tokenizer.mask_token_id, seed=int(cfg.seed),
        compile=bool(extra.get("compile", False)),
        token_ids={"cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id},
    )
    n_params = architectures.count_params(module.model)
    block = int(cfg.data.block_size)
    datamodule = PackedCorpusDataModule(info, block, int(cfg.data.batch_size), int(cfg.seed), int(cfg.data.num_workers),
                                        overfit_batches=overfit_batches(cfg))

    def new_trainer(guard=None):
        ckpt_cbs = checkpoint_callbacks(run_dir.checkpoints, int(cfg.checkpoint.every_n_steps), int(cfg.checkpoint.keep))
        return build_trainer(cfg, run_dir.path, callbacks=ckpt_cbs, guard=guard,
                             flops_per_token=hardware.flops_per_token(module.model.config, block), model=module.model)

    trainer, meter = new_trainer()
    log.info("model: %s (%s parameters, %s objective) | precision %s | %s x %s tokens per step",
             architectures.describe(module.model.config), f"{n_params:,}", task.objective, trainer.precision,
             cfg.data.batch_size, block)
    log.info("run directory: %s", run_dir.path)

    if cfg.get("dry_run"):
        metrics = {"command": "pretrain", "dry_run": True, "params": n_params, "objective": task.objective,
                   "train_blocks": len(datamodule.train_set), "val_blocks": len(datamodule.val_set),
                   "tokens": info.n_tokens}
        run_dir.write_metrics(metrics, status="dry_run")
        print_summary("bigml pretrain (dry run)", metrics)
        return metrics

    ckpt_path = resume_checkpoint(cfg.get("resume"), run_dir.path)
    initial = {}
    if ckpt_path is None:
        initial = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    else:
        log.info("resuming from %s", ckpt_path)
    t0 = time.perf_counter()

    def rebuild():  # after a rollback (trainer.on_nonfinite=rollback): a fresh trainer, the same guard
        nonlocal meter
        fresh, meter = new_trainer(guard_of(trainer))
        return fresh

    trainer = fit_with_rollback(trainer, lambda t, ckpt: t.fit(module, datamodule=datamodule, ckpt_path=ckpt),
                                str(ckpt_path) if ckpt_path else None, rebuild)
    train_time = time.perf_counter() - t0
    if trainer.interrupted:
        raise KeyboardInterrupt
    if module.last_val_step == trainer.global_step:  # fit just validated at the last step
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    else:
        final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    trainer.save_checkpoint(str(run_dir.checkpoints / "last.ckpt"), weights_only=False)
    identical = replicas_identical(trainer, module.model)
    gathered = full_state_dict(trainer)  # FSDP: every rank takes part in gathering the shards

    metrics: dict[str, Any] = {
        "command": "pretrain",
        "objective": task.objective,
        "model": cfg.model.get("name") if not init_path else str(init_path),
        "params": n_params,
        "train_loss": module.recent_train_loss(),
        "val_loss": final.get("val_loss"),
        "val_perplexity": final.get("val_perplexity"),
        "val_loss_initial": initial.get("val_loss"),
        "step": trainer.global_step,
        "tokens_seen": module.tokens_seen,
        "train_time_s": round(train_time, 2),
        "precision": str(trainer.precision),
        "devices": trainer.world_size,
        "model_dir": str(run_dir.model_dir),
        "bad_rows_skipped": info.bad_rows_skipped,
    }
    if task.accuracy_reported():
        metrics["val_accuracy"] = final.get("val_accuracy")
    metrics.update({f"val_{k}": final.get(f"val_{k}") for k in task.extra_validation_metrics})
    if identical is not None:
        metrics["replicas_identical"] = identical
    metrics.update({k: v for k, v in meter.summary().items()})
    metrics.update(guard_of(trainer).summary())
    metrics["decisions"] = extra["decisions"]
    if trainer.is_global_zero:
        weights = {k.removeprefix("model."): v for k, v in gathered.items()} if gathered is not None else None
        run_dir.export_model(module.model, tokenizer, state_dict=weights, metadata={
            "command": "pretrain", "task": task.name, "objective": task.objective, "block_size": block, "step": trainer.global_step,
            "run_dir": str(run_dir.path),
        })
        run_dir.write_metrics(metrics)
        print_summary("bigml pretrain", {**{k: metrics[k] for k in (
            "model", "params", "step", "tokens_seen", "train_loss", "val_loss_initial", "val_loss", "val_perplexity",
            "tokens_per_sec", "mfu", "precision")}, **{k: v for k, v in metrics.items() if k.startswith("val_nsp")},
            "model_dir": str(run_dir.model_dir)})
    return metrics


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)
