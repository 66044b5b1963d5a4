"""Scoring models: the metrics `bigml eval` writes, as a library (finetune and compress use it too).

API (stable; `bigml compress` builds on it):

    load_model_for_eval(model_path, cfg) -> (model, tokenizer, kind)
        Loads an HF model directory for scoring. `kind` is one of KINDS ("classification",
        "multilabel", "regression", "token", "causal_lm", "masked_lm"), read from the directory's
        config (architectures / problem_type / num_labels) unless cfg.task.name names a task.
        The tokenizer comes from cfg.tokenizer.path, else the model directory (DataError if none).

    evaluate_model(model, tokenizer, cfg, split="test", kind=None) -> dict[str, float]
        Scores an in-memory model (possibly quantized or pruned: only `model(**batch)` is called,
        parameter dtypes are not assumed) on cfg.data, batch size cfg.eval.batch_size, length
        cfg.eval.max_length (else cfg.data.max_length / block_size). The keys are those `bigml eval`
        writes to metrics.json:
          classification  accuracy f1_macro f1_micro f1_weighted precision_macro recall_macro ece loss
          multilabel      accuracy (exact match) f1_macro f1_micro precision_macro recall_macro loss
          regression      mse rmse mae r2 pearson spearman loss(=mse)
          token           precision recall f1 (entity level, BIO spans) token_accuracy loss
          causal_lm       loss perplexity bits_per_byte tokens
          masked_lm       loss perplexity accuracy bits_per_byte tokens (masked tokens, fixed seed)
        plus `examples` (rows scored). `split` is test | val | train | all | auto (see conf/eval.yaml).

    evaluate_detailed(...) -> Report  same, plus the per-class table, confusion matrix and rows'
        predictions (for reports and predictions.jsonl).

    check_gates(metrics, cfg.eval) raises GateFailed (exit 1) for eval.fail_below / fail_above.

Metrics are torchmetrics objects updated batch by batch (no logits are kept); masking for masked
LMs uses a generator seeded by the batch index, so two runs give identical numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics import classification as C
from torchmetrics import regression as R

from bigml.errors import ConfigError, DataError, GateFailed

log = logging.getLogger("bigml")
KINDS = ("classification", "multilabel", "regression", "token", "causal_lm", "masked_lm")
TASK_KINDS = ("classification", "multilabel", "regression", "token")
LOWER_IS_BETTER = {"loss", "perplexity", "bits_per_byte", "mse", "mae", "rmse", "ece"}


# -- what a model directory is ---------------------------------------------------------------

def infer_kind(config) -> str:
    """The kind of model a transformers config describes (its head)."""
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else ""
    if arch.endswith("ForSequenceClassification"):
        pt = getattr(config, "problem_type", None)
        if pt == "regression" or (pt is None and int(getattr(config, "num_labels", 2)) == 1):
            return "regression"
        if pt == "multi_label_classification":
            return "multilabel"
        return "classification"
    if arch.endswith("ForTokenClassification"):
        return "token"
    if arch.endswith("ForMaskedLM") or arch.endswith("ForPreTraining"):
        return "masked_lm"
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "causal_lm"
    from bigml.models.architectures import objective_of

    try:
        return "masked_lm" if objective_of(config) == "masked" else "causal_lm"
    except DataError:
        raise DataError(f"model.path: cannot tell what a {arch or config.model_type} model scores; "
                        f"set task=classification|multilabel|regression|token") from None


def auto_class(kind: str):
    import transformers as T

    return {"classification": T.AutoModelForSequenceClassification, "multilabel": T.AutoModelForSequenceClassification,
            "regression": T.AutoModelForSequenceClassification, "token": T.AutoModelForTokenClassification,
            "causal_lm": T.AutoModelForCausalLM, "masked_lm": T.AutoModelForMaskedLM}[kind]


def _task_name(cfg) -> str | None:
    task = cfg.get("task")
    name = task.get("name") if task is not None else None
    return None if name in (None, "auto") else str(name)


def load_model_for_eval(model_path, cfg) -> tuple[Any, Any, str]:
    from bigml.data.tokenizer import load_tokenizer
    from bigml.models.architectures import has_weights, read_config

    if not model_path:
        raise ConfigError("model.path", "required", "set model.path=<a model directory>")
    path = str(Path(str(model_path)).expanduser())
    config = read_config(path)
    inferred = infer_kind(config)
    kind = _task_name(cfg) or inferred
    if kind not in KINDS:
        raise ConfigError("task", f"unknown task {kind!r}", f"choose one of {', '.join(TASK_KINDS)}")
    if kind in TASK_KINDS and inferred in ("causal_lm", "masked_lm"):
        raise DataError(f"model.path={model_path}: a language model without a {kind} head; finetune it first "
                        f"(bigml finetune model.path={model_path} task={kind})")
    if kind == "regression" and inferred in ("classification", "multilabel"):
        raise DataError(f"model.path={model_path}: a classification head ({config.num_labels} labels) cannot be "
                        f"scored as regression; evaluate a regression model or drop task=regression")
    if kind in ("classification", "multilabel") and inferred == "regression":
        raise DataError(f"model.path={model_path}: a regression head cannot be scored as {kind}; drop task={kind}")
    if not has_weights(path):
        raise DataError(f"model.path={model_path}: no weights (model.safetensors / pytorch_model.bin) in the directory")
    tok_path = (cfg.get("tokenizer") or {}).get("path") if cfg.get("tokenizer") is not None else None
    tokenizer = load_tokenizer(str(tok_path or path), "tokenizer.path" if tok_path else "model.path")
    from bigml.compression.storage import load_weights, quantization_of

    if quantization_of(path):  # written by bigml compress (int8/int4 in bigml's format, or a bf16/fp16 cast)
        model = load_weights(path, config, kind)
    else:
        try:
            model = auto_class(kind).from_pretrained(path, dtype=torch.float32)
        except Exception as e:
            raise DataError(f"model.path={model_path}: could not load it as a {kind} model "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    model.eval()
    return model, tokenizer, kind


# -- metrics -----------------------------------------------------------------------------------

class EntitySpans(Metric):
    """Entity-level true/false positives over BIO tag sequences (as seqeval's default mode:
    a span is a B-X (or a stray I-X) followed by I-X; it matches only if type and both ends match)."""

    full_state_update = False

    def __init__(self, id2tag: dict[int, str]):
        super().__init__()
        self.id2tag = id2tag
        self.add_state("tp", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("n_pred", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("n_gold", torch.tensor(0), dist_reduce_fx="sum")

    @staticmethod
    def spans(tags: list[str]) -> set[tuple[int, int, str]]:
        out, start, typ = set(), None, None
        for i, t in enumerate([*tags, "O"]):
            prefix, _, kind = t.partition("-") if "-" in t else (t, "", "")
            if start is not None and (prefix in ("O", "B") or kind != typ or prefix not in ("I",)):
                out.add((start, i, typ))
                start, typ = None, None
            if prefix in ("B", "I") and start is None:
                start, typ = i, kind
        return out

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        for p_row, t_row in zip(preds.tolist(), target.tolist(), strict=False):
            keep = [(p, t) for p, t in zip(p_row, t_row, strict=False) if t != -100]
            gold = self.spans([self.id2tag[t] for _, t in keep])
            pred = self.spans([self.id2tag[p] for p, _ in keep])
            self.tp += len(gold & pred)
            self.n_pred += len(pred)
            self.n_gold += len(gold)

    def compute(self) -> dict[str, torch.Tensor]:
        tp, n_pred, n_gold = self.tp.double(), self.n_pred.double(), self.n_gold.double()
        p = tp / n_pred if n_pred > 0 else torch.tensor(0.0, dtype=torch.float64)
        r = tp / n_gold if n_gold > 0 else torch.tensor(0.0, dtype=torch.float64)
        f = 2 * p * r / (p + r) if (p + r) > 0 else torch.tensor(0.0, dtype=torch.float64)
        return {"precision": p, "recall": r, "f1": f}


class Scorer:
    """Task metrics accumulated over batches: `update(logits, labels)`, then `compute()`."""

    def __init__(self, kind: str, label_names: list[str], ece_bins: int = 15, threshold: float = 0.5):
        self.kind, self.label_names, self.threshold = kind, label_names, threshold
        self.loss = MeanMetric()
        n = len(label_names)
        m: dict[str, Metric] = {}
        if kind == "classification":
            if n < 2:
                raise DataError("classification needs at least 2 labels")
            m = {"accuracy": C.MulticlassAccuracy(n, average="micro"),
                 "f1_macro": C.MulticlassF1Score(n, average="macro"),
                 "f1_micro": C.MulticlassF1Score(n, average="micro"),
                 "f1_weighted": C.MulticlassF1Score(n, average="weighted"),
                 "precision_macro": C.MulticlassPrecision(n, average="macro"),
                 "recall_macro": C.MulticlassRecall(n, average="macro"),
                 "ece": C.MulticlassCalibrationError(n, n_bins=ece_bins, norm="l1"),
                 "_precision": C.MulticlassPrecision(n, average=None),
                 "_recall": C.MulticlassRecall(n, average=None),
                 "_f1": C.MulticlassF1Score(n, average=None),
                 "_confusion": C.MulticlassConfusionMatrix(n)}
        elif kind == "multilabel":
            m = {"accuracy": C.MultilabelExactMatch(n, threshold=threshold),
                 "f1_macro": C.MultilabelF1Score(n, average="macro", threshold=threshold),
                 "f1_micro": C.MultilabelF1Score(n, average="micro", threshold=threshold),
                 "precision_macro": C.MultilabelPrecision(n, average="macro", threshold=threshold),
                 "recall_macro": C.MultilabelRecall(n, average="macro", threshold=threshold),
                 "_precision": C.MultilabelPrecision(n, average=None, threshold=threshold),
                 "_recall": C.MultilabelRecall(n, average=None, threshold=threshold),
                 "_f1": C.MultilabelF1Score(n, average=None, threshold=threshold)}
        elif kind == "regression":
            m = {"mse": R.MeanSquaredError(), "mae": R.MeanAbsoluteError(), "r2": R.R2Score(),
                 "pearson": R.PearsonCorrCoef(), "spearman": R.SpearmanCorrCoef()}
        elif kind == "token":
            m = {"token_accuracy": C.MulticlassAccuracy(n, average="micro", ignore_index=-100),
                 "_spans": EntitySpans(dict(enumerate(label_names)))}
        self.metrics = m
        self.count = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Update with a batch; returns the batch's predictions (class ids / 0-1 matrix / values)."""
        logits = logits.detach().float().cpu()
        labels = labels.detach().cpu()
        k = self.kind
        if k == "classification":
            loss = torch.nn.functional.cross_entropy(logits, labels.long())
            probs = logits.softmax(-1)
            for _name, metric in self.metrics.items():
                metric.update(probs, labels.long())
            preds = probs.argmax(-1)
            n = labels.numel()
        elif k == "multilabel":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
            probs = logits.sigmoid()
            for metric in self.metrics.values():
                metric.update(probs, labels.long())
            preds = (probs >= self.threshold).long()
            n = labels.shape[0]
        elif k == "regression":
            values = logits.reshape(-1)
            target = labels.reshape(-1).float()
            loss = torch.nn.functional.mse_loss(values, target)
            for metric in self.metrics.values():
                metric.update(values, target)
            preds = values
            n = target.numel()
        else:  # token
            mask = labels != -100
            loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask].long()) if mask.any() else torch.tensor(0.0)
            preds = logits.argmax(-1)
            self.metrics["token_accuracy"].update(preds, labels.long())
            self.metrics["_spans"].update(preds, labels.long())
            n = int(mask.sum())
        if n:
            self.loss.update(loss, weight=n)
        self.count += labels.shape[0]
        return preds

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            if name == "_spans":
                out.update({k: float(v) for k, v in metric.compute().items()})
            elif not name.startswith("_"):
                out[name] = float(metric.compute())
        out["loss"] = float(self.loss.compute()) if self.count else float("nan")
        if self.kind == "regression":
            out["rmse"] = math.sqrt(out["mse"])
        out["examples"] = self.count
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}

    def per_class(self) -> list[dict[str, Any]]:
        if self.kind not in ("classification", "multilabel"):
            return []
        p, r, f = (self.metrics[k].compute().tolist() for k in ("_precision", "_recall", "_f1"))
        support = self.confusion().sum(1).tolist() if self.kind == "classification" else [None] * len(p)
        return [{"label": name, "precision": p[i], "recall": r[i], "f1": f[i], "support": support[i]}
                for i, name in enumerate(self.label_names)]

    def confusion(self) -> torch.Tensor | None:
        return self.metrics["_confusion"].compute() if "_confusion" in self.metrics else None

    def reset(self) -> None:
        self.loss.reset()
        for m in self.metrics.values():
            m.reset()
        self.count = 0


# -- scoring a model ----------------------------------------------------------------------------

@dataclass
class Report:
    kind: str
    metrics: dict[str, float]
    label_names: list[str] = field(default_factory=list)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confusion: list[list[int]] | None = None
    rows: list[dict[str, Any]] | None = None  # predictions (when asked for)


def model_kind(model, cfg) -> str:
    return _task_name(cfg) or getattr(model, "_bigml_kind", None) or infer_kind(model.config)


def _device(model) -> torch.device:
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:
        return torch.device("cpu")


def model_label_names(model, kind: str) -> list[str]:
    if kind == "regression":
        return []
    config = model.config
    id2label = getattr(config, "id2label", None) or {}
    n = int(getattr(config, "num_labels", len(id2label)))
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def resolve_split(cfg, raw) -> str:
    split = str(cfg.eval.get("split") or "auto")
    if split != "auto":
        return split
    if cfg.data.get("test_path"):
        return "test"
    return "all" if raw is not None and raw.all is not None else "test"


def evaluate_model(model, tokenizer, cfg, split: str = "test", kind: str | None = None) -> dict[str, float]:
    return evaluate_detailed(model, tokenizer, cfg, split=split, kind=kind).metrics


def evaluate_detailed(model, tokenizer, cfg, split: str = "test", kind: str | None = None,
                      keep_rows: bool = False) -> Report:
    kind = kind or model_kind(model, cfg)
    if kind in ("causal_lm", "masked_lm"):
        return Report(kind, evaluate_lm(model, tokenizer, cfg, kind))
    return evaluate_task(model, tokenizer, cfg, kind, split, keep_rows)


def _forward_kwargs(batch: dict, model) -> dict:
    """The batch minus labels (we compute losses ourselves: class weights, quantized heads)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def evaluate_task(model, tokenizer, cfg, kind: str, split: str = "test", keep_rows: bool = False,
                  encoded=None, raw_rows=None) -> Report:
    from omegaconf import OmegaConf

    from bigml.data import labeled

    names = model_label_names(model, kind)
    if encoded is None:
        task_cfg = OmegaConf.create({"name": kind, "label_separator": (cfg.get("task") or {}).get("label_separator") or ","})
        raw = labeled.read_labeled(labeled._data_cfg(_with_task(cfg, task_cfg)), kind, int(cfg.get("seed", 0)), need_train=False)
        if split == "auto":
            split = resolve_split(cfg, raw)
        ds = raw.get(split)
        if kind == "classification" and all(labeled._is_number(x) for x in ds.unique("label")) and \
                any(not float(x).is_integer() for x in ds.unique("label")[:50]):
            raise DataError(f"data ({split} split): labels like {ds['label'][0]} are numbers, but the model is a "
                            f"classification head ({', '.join(names[:6])}); use a regression model")
        label2id = labeled.label_map_for_model(names if kind != "regression" else [], model.config) if kind != "regression" else {}
        if kind != "regression":
            if set(label2id) != set(names):  # LABEL_i defaults: index labels by integer value
                names = [k for k, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
            labeled.check_labels(ds, kind, label2id, f"data ({split} split)", "the model's labels")
        max_length = labeled.effective_max_length(cfg.eval.get("max_length") or cfg.data.get("max_length"), tokenizer, model.config)
        encoded = labeled.encode(ds, tokenizer, kind, label2id, max_length, where=f"data ({split} split)")
        raw_rows = ds
    loader = labeled.make_loader(encoded, tokenizer, kind, int(cfg.eval.get("batch_size") or 32))
    threshold = float((cfg.get("task") or {}).get("threshold") or 0.5)
    scorer = Scorer(kind, names, int(cfg.eval.get("ece_bins") or 15), threshold)
    device = _device(model)
    rows: list[dict[str, Any]] = [] if keep_rows else None
    max_batches = cfg.eval.get("max_batches")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= int(max_batches):
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**_forward_kwargs(batch, model)).logits
            if kind == "regression":
                logits = logits.reshape(-1)
            preds = scorer.update(logits, batch["labels"])
            if rows is not None:
                rows.extend(_prediction_rows(kind, logits.float().cpu(), preds, batch["labels"].cpu(), names))
    if was_training:
        model.train()
    if rows is not None and raw_rows is not None:
        for r, text in zip(rows, raw_rows["text"], strict=False):
            r["text"] = " ".join(text) if isinstance(text, list) else text
        rows = [{"text": r.pop("text"), **r} for r in rows]
    conf = scorer.confusion()
    return Report(kind, scorer.compute(), names, scorer.per_class(), conf.tolist() if conf is not None else None, rows)


def _with_task(cfg, task_cfg):
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    c["task"] = OmegaConf.to_container(task_cfg)
    return OmegaConf.create(c)


def _prediction_rows(kind, logits, preds, labels, names) -> list[dict[str, Any]]:
    out = []
    if kind == "classification":
        probs = logits.softmax(-1)
        for p, y, pr in zip(preds.tolist(), labels.tolist(), probs.tolist(), strict=False):
            out.append({"label": names[y], "predicted": names[p],
                        "probabilities": {names[i]: round(v, 6) for i, v in enumerate(pr)}})
    elif kind == "multilabel":
        probs = logits.sigmoid()
        for p, y, pr in zip(preds.tolist(), labels.tolist(), probs.tolist(), strict=False):
            out.append({"label": [names[i] for i, v in enumerate(y) if v >= 0.5],
                        "predicted": [names[i] for i, v in enumerate(p) if v],
                        "probabilities": {names[i]: round(v, 6) for i, v in enumerate(pr)}})
    elif kind == "regression":
        for p, y in zip(preds.tolist(), labels.reshape(-1).tolist(), strict=False):
            out.append({"label": y, "predicted": p, "probabilities": None})
    else:
        probs = logits.softmax(-1)
        for p_row, y_row, pr_row in zip(preds.tolist(), labels.tolist(), probs.tolist(), strict=False):
            keep = [i for i, y in enumerate(y_row) if y != -100]
            out.append({"label": [names[y_row[i]] for i in keep], "predicted": [names[p_row[i]] for i in keep],
                        "probabilities": [round(max(pr_row[i]), 6) for i in keep]})
    return out


def evaluate_lm(model, tokenizer, cfg, kind: str) -> dict[str, float]:
    """Loss / perplexity / bits per byte on a text corpus (cfg.data with kind: corpus)."""
    from bigml.data import sources
    from bigml.data.packed import PackedBlocks, pack_corpus
    from bigml.models.language_model import mask_tokens

    if cfg.data.get("kind") == "labeled":
        raise ConfigError("data", f"a {kind.replace('_', ' ')} is scored on a text corpus, not labeled data",
                          "use data=text data.path=<text files> (or data=python-stdlib)")
    objective = "masked" if kind == "masked_lm" else "causal"
    if objective == "masked" and tokenizer.mask_token_id is None:
        raise DataError("the tokenizer has no mask token, which masked-LM scoring needs")
    files = sources.corpus_files(cfg.data)
    key = sources.fingerprint(cfg.data, files)
    block = int(cfg.eval.get("max_length") or cfg.data.get("block_size") or 128)
    from bigml.data.labeled import model_max_length

    limit = model_max_length(tokenizer, model.config)
    if limit and block > limit:
        block = limit
    info, _ = pack_corpus(cfg.data, tokenizer, objective, lambda: sources.load_documents(cfg.data, files), key,
                          str(cfg.cache_dir), int(cfg.get("seed", 0)), float(cfg.data.get("val_fraction") or 0.05))
    split = str(cfg.eval.get("split") or "auto")
    start, end = (0, info.n_train) if split == "train" else (info.n_train, info.n_tokens) if split in ("val", "test") else (0, info.n_tokens)
    blocks = PackedBlocks(info, start, end, block)
    if len(blocks) == 0:
        raise DataError(f"data: the corpus has fewer than {block} tokens; lower eval.max_length")
    bs = int(cfg.eval.get("batch_size") or 32)
    loader = torch.utils.data.DataLoader(blocks, batch_size=bs, shuffle=False)
    device = _device(model)
    loss_m, acc_m = MeanMetric(), MeanMetric()
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long, device=device)
    seed = int(cfg.get("seed", 0))
    max_batches = cfg.eval.get("max_batches")
    targets = 0
    model.eval()
    with torch.no_grad():
        for i, ids in enumerate(loader):
            if max_batches is not None and i >= int(max_batches):
                break
            ids = ids.to(device)
            if objective == "causal":
                logits = model(input_ids=ids).logits[:, :-1].float()
                target = ids[:, 1:]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
                n = target.numel()
            else:
                g = torch.Generator(device=device).manual_seed(seed + 7919 * i)
                inputs, labels = mask_tokens(ids, mask_id=tokenizer.mask_token_id, vocab_size=model.config.vocab_size,
                                             special_ids=special, probability=float(cfg.eval.get("mlm_probability") or 0.15),
                                             generator=g)
                logits = model(input_ids=inputs).logits.float()
                chosen = labels != -100
                loss = torch.nn.functional.cross_entropy(logits[chosen], labels[chosen])
                n = int(chosen.sum())
                hit = (logits[chosen].argmax(-1) == labels[chosen]).float()
                acc_m.update(hit.mean().cpu(), weight=n)
            loss_m.update(loss.cpu(), weight=n)
            targets += n
    loss = float(loss_m.compute())
    tokens_per_byte = info.n_tokens / max(info.n_bytes, 1)
    out = {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50)), 6),
           "bits_per_byte": round(loss * tokens_per_byte / math.log(2), 6), "tokens": targets}
    if objective == "masked":
        out["accuracy"] = round(float(acc_m.compute()), 6)
    return out


# -- CI gates ----------------------------------------------------------------------------------------

def check_gates(metrics: dict[str, Any], eval_cfg, prefix: str = "") -> list[str]:
    """Raise GateFailed listing every unmet gate; returns the lines of the gates that passed."""
    failed, passed = [], []
    for direction in ("fail_below", "fail_above"):
        gates = eval_cfg.get(direction) or {}
        for name, limit in gates.items():
            if limit is None:
                continue
            key = f"{prefix}{name}"
            if key not in metrics or not isinstance(metrics[key], (int, float)):
                from bigml.errors import UsageError

                have = ", ".join(k for k, v in metrics.items() if isinstance(v, float))
                raise UsageError(f"eval.{direction}.{name}: this evaluation has no metric {name}; it has {have}")
            value = float(metrics[key])
            bad = value < float(limit) if direction == "fail_below" else value > float(limit)
            line = f"{name} = {value:.4g} {'<' if direction == 'fail_below' else '>'} {float(limit):.4g}" if bad else \
                f"{name} = {value:.4g} ({'>=' if direction == 'fail_below' else '<='} {float(limit):.4g})"
            (failed if bad else passed).append(line)
    if failed:
        raise GateFailed(f"gate failed: {'; '.join(failed)} (eval.fail_below / eval.fail_above)")
    return passed


__all__ = ["KINDS", "Report", "Scorer", "check_gates", "evaluate_detailed", "evaluate_model", "infer_kind",
           "load_model_for_eval"]
