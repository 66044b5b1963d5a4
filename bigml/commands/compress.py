"""bigml compress: make a trained model smaller or faster, and prove what it cost.

    model.path --load--> model --measure + evaluate_model--> before
    for each stage of method=[distill,prune,quantize] (in the order given):
        stage(model) --save (model/ for the last stage, stages/<n>-<method>/ before it)--> reload from disk
        --measure + evaluate_model--> after
    --> <run>/metrics.json (before, after, stages[]), <run>/model/, a table on stderr

Every "after" is measured on the model reloaded from what was written, so the report describes
exactly what `bigml eval` / `bigml generate` will load. The metric comes from bigml.evaluation, the
code `bigml eval` runs. The input directory is only read (its checksum is compared at the end).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from bigml.atomic import atomic_directory
from bigml.compression import distill, measure, prune, quantize, storage
from bigml.errors import ConfigError, UsageError
from bigml.run_dir import RunDir
from bigml.tasks import Task

log = logging.getLogger("bigml")
METHODS = ("quantize", "prune", "distill")


# -- the command line ------------------------------------------------------------------------------

def methods_of(cfg: DictConfig) -> list[str]:
    """The stages in order. `method` is a config group (shared with finetune's full/lora), so a chain
    `method=[a,b]` reaches the config merged; its order is read back from the override itself."""
    from hydra.core.hydra_config import HydraConfig

    raw: Any = None
    if HydraConfig.initialized():
        for o in HydraConfig.get().overrides.task:
            key, _, value = o.partition("=")
            if key.lstrip("+~") == "method":
                raw = value
    if raw is None:
        raw = cfg.method.get("name") if OmegaConf.is_dict(cfg.method) else cfg.method
    if OmegaConf.is_list(raw) or isinstance(raw, (list, tuple)):
        names = [str(x) for x in raw]
    else:
        names = [x.strip().strip("'\"") for x in str(raw).strip().strip("[]").split(",") if x.strip()]
    for name in names:
        if name not in METHODS:
            raise ConfigError("method", f"unknown method {name!r}", f"choose one of {', '.join(METHODS)}, or a chain like [distill,prune,quantize]")
    if not names:
        raise ConfigError("method", "empty", f"choose one of {', '.join(METHODS)}")
    if "quantize" in names and names.index("quantize") != len(names) - 1:
        raise ConfigError("method", "quantize must be the last stage of a chain",
                          "a quantized model is not trained or pruned further; e.g. method=[distill,prune,quantize]")
    if len(set(names)) != len(names):
        raise ConfigError("method", f"{names}: each method at most once per chain", "chain runs through model.path instead")
    return names


def check_options(cfg: DictConfig, methods: list[str]) -> None:
    """Every bad value fails here, before a model is loaded."""
    q, p, d = cfg.quantize, cfg.prune, cfg.distill
    if "quantize" in methods:
        quantize.check_options(str(q.dtype), str(q.backend), bool(q.weight_only), _exclude(cfg))
    if "prune" in methods:
        prune.check_options(float(p.sparsity), p.structured if p.structured not in ("null", "none", "") else None, str(p.scope))
        if int(p.recover_steps) < 0:
            raise ConfigError("prune.recover_steps", f"{p.recover_steps} must be >= 0")
    if "distill" in methods:
        if float(d.temperature) <= 0:
            raise ConfigError("distill.temperature", f"{d.temperature} must be positive")
        if not 0.0 <= float(d.alpha) <= 1.0:
            raise ConfigError("distill.alpha", f"{d.alpha} is outside [0, 1]", "it weighs the KD loss against the hard-label loss")
        if int(d.steps) < 1:
            raise ConfigError("distill.steps", f"{d.steps} must be at least 1")
    m = cfg.measure
    if int(m.batch_size) < 1 or int(m.seq_len) < 2 or int(m.repeats) < 1:
        raise ConfigError("measure", "batch_size >= 1, seq_len >= 2 and repeats >= 1 are needed")


# -- data and scoring (bigml.evaluation and bigml.data.labeled: the same code as bigml eval / finetune) --

def score(model, tokenizer, cfg: DictConfig, task: Task) -> dict[str, float]:
    """The task metric(s), exactly as `bigml eval` computes them. The one seam to the eval code."""
    from bigml.evaluation import evaluate_model

    return evaluate_model(model, tokenizer, cfg, split=str(cfg.eval.get("split") or "test"), task=task)


def train(cfg: DictConfig, run_dir: RunDir, name: str, student, task: Task, tokenizer, steps: int,
          teacher=None, batch_size: int | None = None) -> dict:
    """A short Lightning run (distillation, or recovery after pruning) of `steps` optimizer steps."""
    from bigml.training.trainer import build_trainer

    bs = int(batch_size or cfg.data.get("batch_size") or 16)
    loader = task.training_batches(cfg, tokenizer, student, bs)
    c = copy.deepcopy(cfg)
    with open_dict(c):
        c.trainer.max_steps = int(steps)
        c.trainer.max_epochs = None
        c.trainer.limit_val_batches = 0
        c.trainer.val_check_interval = int(steps)  # with limit_val_batches=0: never validates
        c.trainer.num_sanity_val_steps = 0
        c.trainer.enable_checkpointing = False
    trainer, _ = build_trainer(c, run_dir.path / "train" / name, callbacks=[], flops_per_token=None, model=student)
    module = distill.CompressionTraining(
        student, OmegaConf.to_container(cfg.optimizer, resolve=True), OmegaConf.to_container(cfg.scheduler, resolve=True),
        task.name, teacher=teacher, temperature=float(cfg.distill.temperature), alpha=float(cfg.distill.alpha),
        hidden_weight=float(cfg.distill.hidden_weight), mask_token_id=tokenizer.mask_token_id,
        special_ids=sorted(set(tokenizer.all_special_ids)), seed=int(cfg.seed))
    student.train()
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    if trainer.interrupted:
        raise KeyboardInterrupt
    student.eval()
    losses = module.losses
    tail = losses[-20:]
    head = losses[:20]
    return {"steps": trainer.global_step, "train_time_s": round(time.perf_counter() - t0, 2),
            "train_loss_first": round(sum(head) / len(head), 6) if head else None,  # mean of the first 20 steps
            "train_loss": round(sum(tail) / len(tail), 6) if tail else None}           # ... and of the last 20


# -- stages ---------------------------------------------------------------------------------------

def _exclude(cfg) -> list[str]:
    value = cfg.quantize.get("exclude")
    if value is None:
        return []
    return [str(v) for v in value] if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [str(value)]


def stage_quantize(cfg, model, task, tokenizer) -> tuple[Any, dict | None, dict]:
    q = cfg.quantize
    dtype, weight_only, backend = str(q.dtype), bool(q.weight_only), str(q.backend)
    scheme = quantize.scheme_for(dtype, weight_only)
    info: dict[str, Any] = {"dtype": dtype, "scheme": scheme}
    fmt = "bigml"
    if scheme in storage.INT_SCHEMES:
        backend, fmt = quantize.resolve_backend(model, scheme, backend)
        info["backend"], info["format"] = backend, fmt
        if fmt == "bigml":
            info["note"] = (f"saved in bigml's quantized format ({backend}): bigml eval / generate / serve load it, "
                            f"plain transformers does not" + (" (GPT-2's Conv1D layers)" if quantize.has_conv1d(model) else ""))
    qmodel = copy.deepcopy(model).float() if scheme in storage.INT_SCHEMES else copy.deepcopy(model)
    marker = quantize.plan(qmodel, dtype, weight_only, backend, fmt, _exclude(cfg))
    qmodel, state_dict = quantize.quantize_for_save(qmodel, marker)
    if "modules" in marker:
        info["quantized_modules"] = len(marker["modules"])
        if marker.get("exclude"):
            info["exclude"] = marker["exclude"]
    setattr(qmodel.config, storage.QUANT_KEY, marker)
    return qmodel, state_dict, info


def stage_prune(cfg, run_dir, index, model, task, tokenizer) -> tuple[Any, None, dict]:
    p = cfg.prune
    structured = p.structured if p.structured not in ("null", "none", "") else None
    sparsity = float(p.sparsity)
    m = copy.deepcopy(model)
    info: dict[str, Any] = {"sparsity_target": sparsity, "structured": structured}
    modules = []
    if structured is None:
        info["scope"] = str(p.scope)
        modules = prune.apply_unstructured(m, sparsity, str(p.scope))
        info["note"] = ("unstructured sparsity: the zeros stay in dense tensors, so with dense kernels "
                        "size on disk and latency do not change")
    elif structured == "vocab":  # the tokens the training split uses; prune.sparsity does not apply
        from bigml.compression import vocab

        vocab.check_supported(m, tokenizer)
        keep = vocab.used_ids(task.training_batches(cfg, tokenizer, m, int(cfg.data.get("batch_size") or 16)), tokenizer)
        info.update(sparsity_target=None, vocab_before=int(m.config.vocab_size), vocab_kept=len(keep))
        m, tokenizer = vocab.trim(m, tokenizer, keep)
        info["tokenizer"] = tokenizer  # the run goes on with it (taken out before the info is recorded)
        log.info("vocabulary: kept %d of %d tokens (those the training split uses)", len(keep), info["vocab_before"])
    elif structured == "ffn":
        info["ffn_neurons_kept"] = prune.prune_ffn(m, sparsity)
    else:
        info["layers_kept"] = prune.prune_layers(m, sparsity)
    if int(p.recover_steps) > 0:
        info["recovery"] = train(cfg, run_dir, f"{index}-prune", m, task, tokenizer, int(p.recover_steps))
    prune.make_permanent(modules)
    return m, None, info


def _check_student_size(name: str, teacher, task: Task) -> None:
    from bigml.models.architectures import count_params

    student = distill.named_student(name, teacher, task, _preset(name))
    t_params, s_params = count_params(teacher), count_params(student)
    if s_params >= t_params:
        raise UsageError(f"distill.student={name}: the student has {s_params:,} parameters, not fewer than the "
                         f"teacher's {t_params:,}; choose a smaller preset or distill.student=half")


def stage_distill(cfg, run_dir, index, model, task, tokenizer) -> tuple[Any, None, dict]:
    from bigml.models.architectures import count_params

    d = cfg.distill
    name = str(d.student)
    if name == "half":
        student = distill.half_student(model)
    else:
        student = distill.named_student(name, model, task, _preset(name))
    t_params, s_params = count_params(model), count_params(student)
    if s_params >= t_params:
        _check_student_size(name, model, task)
    teacher = copy.deepcopy(model).float().eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    info = {"student": name, "teacher_params": t_params, "student_params": s_params,
            "temperature": float(d.temperature), "alpha": float(d.alpha), "hidden_weight": float(d.hidden_weight)}
    info.update(train(cfg, run_dir, f"{index}-distill", student, task, tokenizer, int(d.steps), teacher=teacher,
                      batch_size=d.get("batch_size")))
    return student, None, info


def _preset(name: str):
    """conf/model/<name>.yaml, composed (a preset inherits its arch defaults)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException
    from hydra.types import RunMode

    from bigml.errors import did_you_mean

    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    if loader is None:
        raise UsageError("distill.student: named presets need the bigml CLI (Hydra) to compose them")
    try:
        return loader.load_configuration("pretrain", [f"model={name}"], run_mode=RunMode.RUN).model
    except MissingConfigException:
        options = sorted(loader.get_group_options("model"))
        raise ConfigError("distill.student", f"unknown student {name!r}{did_you_mean(name, options)}",
                          f"choose half or one of {', '.join(options)}") from None


# -- the command ----------------------------------------------------------------------------------

def run(cfg: DictConfig) -> dict[str, Any]:
    methods = methods_of(cfg)
    check_options(cfg, methods)
    path = cfg.model.get("path")
    if not path:
        raise ConfigError("model.path", "required", "set model.path=<the model directory to compress>")
    path = str(Path(str(path)).expanduser())
    storage.check_model_dir(path)
    already = storage.quantization_of(path)
    if already and "quantize" in methods:
        raise UsageError(f"model.path={path}: already quantized ({already.get('scheme')} by bigml compress); "
                         f"quantize the model it came from instead")
    if already and already.get("scheme") in storage.INT_SCHEMES:
        raise UsageError(f"model.path={path}: an {already.get('scheme')} model cannot be pruned or distilled; "
                         f"compress the unquantized model (method=[{','.join(methods)},quantize])")
    checksum = storage.tree_checksum(path)

    run_dir = RunDir.open(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    from bigml.evaluation import load_model_for_eval

    model, tokenizer, task = load_model_for_eval(path, cfg)
    if not task.compressible:
        raise ConfigError("model.path", f"{path} is a {task.name} model; bigml compress measures and compresses "
                          f"text models (transformers with a tokenizer)", "compress a text model")
    log.info("compress: %s (%s) | %s | run directory: %s", path, task.name, " -> ".join(methods), run_dir.path)
    mcfg = cfg.measure
    measure_kw = dict(batch_size=int(mcfg.batch_size), seq_len=int(mcfg.seq_len), warmup=int(mcfg.warmup),
                      repeats=int(mcfg.repeats))

    def report(m, where, params=None) -> dict:
        row = measure.measure(m, where, **measure_kw, params=params)
        t0 = time.perf_counter()
        row.update(score(m, tokenizer, cfg, task))
        row["eval_time_s"] = round(time.perf_counter() - t0, 2)
        return row

    if "distill" in methods and str(cfg.distill.student) != "half":  # refuse a too-large student before any work
        _check_student_size(str(cfg.distill.student), model, task)
    before = report(model, path)
    log.info("before: %s", _brief(before))
    history = list(getattr(model.config, storage.HISTORY_KEY, None) or [])
    stages = []
    current, current_before = model, before
    for i, method in enumerate(methods, start=1):
        last = i == len(methods)
        log.info("stage %d/%d: %s", i, len(methods), method)
        t0 = time.perf_counter()
        if method == "quantize":
            new, state_dict, info = stage_quantize(cfg, current, task, tokenizer)
        elif method == "prune":
            new, state_dict, info = stage_prune(cfg, run_dir, i, current, task, tokenizer)
        else:
            new, state_dict, info = stage_distill(cfg, run_dir, i, current, task, tokenizer)
        info["time_s"] = round(time.perf_counter() - t0, 2)
        tokenizer = info.pop("tokenizer", tokenizer)  # prune.structured=vocab renumbers the tokens
        history.append({"method": method, **{k: v for k, v in info.items() if k not in ("recovery", "note")}})
        setattr(new.config, storage.HISTORY_KEY, history)
        meta = {"command": "compress", "methods": methods, "stage": i, "source": path, "run_dir": str(run_dir.path)}
        if last:
            with atomic_directory(run_dir.model_dir, manifest=True) as tmp:
                storage.save_model(new, tokenizer, tmp, meta, state_dict=state_dict)
            where = run_dir.model_dir
        else:
            where = storage.save_model(new, tokenizer, run_dir.path / "stages" / f"{i}-{method}", meta, state_dict=state_dict)
        quant = getattr(new.config, storage.QUANT_KEY, None) or {}
        del new
        reloaded, _ = storage.load_model(str(where))  # measure what was written, not what is in memory
        after = report(reloaded, where, params=quant.get("params"))
        log.info("after %s: %s", method, _brief(after))
        stages.append({"method": method, "model_dir": str(where), "before": current_before, "after": after, **info})
        current, current_before = reloaded, after

    if storage.tree_checksum(path) != checksum:  # a bug, never a user error
        raise RuntimeError(f"model.path={path} changed while compressing")
    final = stages[-1]["after"]
    metric_key = _metric_key(task, final)
    metrics: dict[str, Any] = {
        "command": "compress",
        "methods": methods,
        "task": task.name,
        "model": path,
        "metric": metric_key,
        "before": before,
        "after": final,
        "stages": stages,
        "ratios": _ratios(before, final, metric_key),
        "input_sha256": checksum,
        "model_dir": str(run_dir.model_dir),
    }
    run_dir.write_metrics(metrics)
    print_report(metrics)
    return metrics


def _metric_key(task: Task, row: dict) -> str:
    return task.headline_metric if task.headline_metric in row else "loss"


def _ratios(before: dict, after: dict, metric: str) -> dict:
    def r(a, b):
        return round(a / b, 3) if a and b else None

    out = {"params": r(before["params"], after["params"]), "size": r(before["size_mb"], after["size_mb"]),
           "linear_size": r(before["linear_mb"], after["linear_mb"]),
           "latency_speedup": r(before["latency_ms"], after["latency_ms"])}
    if metric in before and metric in after and isinstance(before[metric], (int, float)):
        out[f"{metric}_change"] = round(after[metric] - before[metric], 6)
    return out


def _brief(row: dict) -> str:
    keys = ("params", "size_mb", "latency_ms", "accuracy", "perplexity", "loss")
    return ", ".join(f"{k} {row[k]}" for k in keys if k in row)


def print_report(metrics: dict) -> None:
    """One column per state (input, then after each stage), one row per quantity."""
    from rich.console import Console
    from rich.table import Table

    from bigml.run_dir import is_global_zero_process

    if not is_global_zero_process():
        return
    metric = metrics["metric"]
    cols = [("input", metrics["before"])] + [(f"{i}. {s['method']}", s["after"]) for i, s in enumerate(metrics["stages"], 1)]
    rows = [("params", "params", "{:,}"), ("size on disk (MB)", "size_mb", "{:.2f}"), ("Linear weights (MB)", "linear_mb", "{:.2f}"),
            ("zero weights", "sparsity", "{:.1%}"), ("latency (ms)", "latency_ms", "{:.1f}"),
            ("throughput (seq/s)", "throughput", "{:.1f}"), (metric, metric, "{:.4f}")]
    extra = [k for k in ("f1_macro", "loss") if k != metric and k in metrics["before"]]
    rows += [(k, k, "{:.4f}") for k in extra]
    rows += [(f"{k} scored", k, "{:,}") for k in ("examples", "tokens") if k in metrics["before"]]  # a metric on 40 rows shows it
    b = metrics["before"]
    table = Table(title=f"bigml compress: {' -> '.join(metrics['methods'])} ({metrics['task']}; "
                        f"{b['batch_size']} x {b['seq_len']} tokens, {b['threads']} threads, median of timed runs)",
                  title_justify="left")
    table.add_column("")
    for name, _ in cols:
        table.add_column(name, justify="right")
    for label, key, fmt in rows:
        cells = []
        for _, row in cols:
            v = row.get(key)
            cells.append(fmt.format(v) if isinstance(v, (int, float)) else "-")
        table.add_row(label, *cells)
    console = Console(stderr=True)
    console.print(table)
    for s in metrics["stages"]:
        if s.get("note"):
            console.print(f"note ({s['method']}): {s['note']}")
        if s.get("format") == "transformers":
            console.print(f"note (quantize): torchao {s['scheme']} saved through transformers' TorchAoConfig: "
                          f"AutoModelFor*.from_pretrained loads it (with torchao installed); torch.compile it for speed")
    console.print(f"model: {metrics['model_dir']}")
