"""What every task provides, and the two families most tasks belong to.

    Task               the interface commands use: auto class, metrics and their direction,
                       inference from a model config, scoring (`evaluate`), distillation loss
    LabeledTask        text in, labels out (classification, multilabel, regression, token):
                       label normalization, encoding, batching, head, loss, torchmetrics, rows of
                       predictions.jsonl
    LanguageModelTask  text in, text out (causal_lm, masked_lm): tokenizer special tokens, the
                       objective's inputs and labels, corpus scoring, decoding

Nothing here imports commands, evaluation or model loading: those import the tasks.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import torch

from bigml.errors import ConfigError, DataError
from bigml.tasks._report import Report

log = logging.getLogger("bigml")

LOWER_IS_BETTER = frozenset({"loss", "perplexity", "bits_per_byte", "mse", "mae", "rmse", "ece"})


class Task:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    auto_class_name: ClassVar[str] = ""     # the transformers AutoModelFor* class of its models
    metrics: ClassVar[tuple[str, ...]] = ("loss",)  # what it reports (bigml eval's metrics.json keys)
    metric: ClassVar[str] = "loss"          # default early-stopping / best-checkpoint metric
    headline_metric: ClassVar[str] = "loss"  # the one compress reports before/after
    lower_is_better: ClassVar[frozenset[str]] = LOWER_IS_BETTER
    infer_priority: ClassVar[int] = 100     # lower: asked first by infer_task
    finetunable: ClassVar[bool] = False     # bigml finetune trains it
    language_model: ClassVar[bool] = False  # scored on a text corpus, trained on packed blocks
    needs_base_model: ClassVar[bool] = False  # finetune: only from model.path (no from-scratch preset)
    # what `bigml serve` answers for its models: "predict" (/v1/predict), "completions" and
    # "chat_completions" (OpenAI's /v1/completions, /v1/chat/completions), "fill_mask" (/v1/fill-mask)
    endpoints: ClassVar[tuple[str, ...]] = ()
    ensembles: ClassVar[bool] = False       # bigml eval model.path=[a,b,c] averages its members' outputs
    draws_images: ClassVar[bool] = False    # bigml generate draws images (`draw`), no prompts
    compressible: ClassVar[bool] = True     # bigml compress measures it (token batches of measure.seq_len)

    # -- models --------------------------------------------------------------------------------
    @property
    def auto_class(self):
        import transformers

        return getattr(transformers, self.auto_class_name)

    def claims(self, config) -> bool:
        """Whether a model with this config (its head) is one of this task's models."""
        return False

    def fits(self, config) -> bool:
        """Whether a model directory recorded as this task (bigml.json) still is one."""
        return self.claims(config)

    def direction(self, metric: str) -> str:
        return "min" if metric in self.lower_is_better else "max"

    def check_model(self, model_task: Task, path: str, config) -> None:
        """Raise DataError when a model whose own task is `model_task` cannot be scored as this task."""

    def head_kwargs(self, label_names: list[str]) -> dict:
        return {}

    def student_config(self, student, teacher) -> None:
        """Give a freshly built student config what the teacher's head needs (labels)."""

    # -- finetuning data (bigml.commands.finetune asks these) ------------------------------------
    summary_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "f1_macro", "f1", "mse", "mae", "r2")

    def read_splits(self, cfg, seed: int):
        """The raw train / val / test rows of cfg.data (a bigml.data.labeled.RawSplits)."""
        raise ConfigError("task", f"{self.name} is not trained by bigml finetune")

    def for_config(self, cfg) -> Task:
        """The task that trains this run: itself, or the variant for what the model and data hold
        (classification of images or of table rows, say)."""
        return self

    def preprocessor_and_config(self, cfg, raw):
        """(preprocessor, starting model config or None, from-scratch config dict or None) for tasks
        whose inputs are not text; None: a tokenizer (model.path's, or trained on the texts)."""
        return None

    def load_preprocessor(self, path: str, key: str = "model.path"):
        """What turns raw inputs into model inputs, from a model directory: its tokenizer."""
        from bigml.data.tokenizer import load_tokenizer

        return load_tokenizer(path, key)

    def eval_loader(self, encoded, tokenizer, batch_size: int):
        """Batches of an encoded split in row order (validation during finetuning)."""
        from bigml.data.labeled import make_loader

        return make_loader(encoded, self.collate_fn(tokenizer), batch_size)

    def augment_training(self, train, cfg):
        """The training rows with data.augment applied (the task's own kind of augmentation)."""
        if cfg.data.get("augment"):
            raise ConfigError("data.augment", f"{self.name} has no data augmentation", "drop data.augment")
        return train

    def combine_outputs(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The ensemble's output from its members' (bigml eval model.path=[a,b,c])."""
        raise ConfigError("model.path", f"{self.name} models cannot be ensembled",
                          "ensembles average classification probabilities or regression values")

    def prepare_tokenizer(self, tokenizer, cfg) -> None:
        """Make the tokenizer ready for batching (a padding token) and for the task."""
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise DataError("the tokenizer has no padding or end-of-text token; set tokenizer.path to one that has")
            tokenizer.pad_token = tokenizer.eos_token

    def training_texts(self, ds) -> list[str]:
        """The texts a from-scratch tokenizer is trained on."""
        return [" ".join(t) if isinstance(t, list) else t for t in ds["text"]]

    def describe_labels(self, names: list[str]) -> str:
        return f"{len(names)} labels ({', '.join(names[:8])})" if names else "no labels"

    def check_labels(self, ds, label2id: dict[str, int], where: str, trained_on: str) -> None:
        """Refuse rows the model cannot be trained or scored on (labels never seen in training)."""

    def check_training_labels(self, names: list[str], n_rows: int) -> None:
        """Refuse a training split the task cannot learn from."""

    def encode(self, ds, tokenizer, label2id: dict[str, int], max_length: int, where: str = "data"):
        raise NotImplementedError

    def encode_options(self, cfg) -> dict:
        """Task settings `encode` takes as keyword arguments."""
        return {}

    def collate_fn(self, tokenizer):
        raise NotImplementedError

    def train_loader(self, encoded, tokenizer, cfg):
        """Training batches: grouped by length (less padding), seeded, padded per batch."""
        from bigml.data.labeled import make_loader

        overfit = int(cfg.trainer.get("overfit_batches") or 0)
        if overfit:  # debug=overfit: the same first batches every epoch
            encoded = encoded.select(range(min(len(encoded), overfit * int(cfg.data.batch_size))))
        return make_loader(encoded, self.collate_fn(tokenizer), int(cfg.data.batch_size), shuffle=True,
                           group_by_length=bool(cfg.data.get("group_by_length", True)), seed=int(cfg.seed),
                           num_workers=int(cfg.data.get("num_workers") or 0))

    def module_options(self, cfg) -> dict:
        """Task settings the LightningModule keeps (plain values: they go into checkpoints)."""
        return {}

    def export_metadata(self, cfg) -> dict:
        """What the exported model's bigml.json records for this task."""
        return {}

    # -- finetuning (bigml.models.task_model.TaskModel asks these) ------------------------------
    peft_task_type: ClassVar[str] = "CAUSAL_LM"

    def before_fit(self, module, encoded: dict, tokenizer, cfg) -> None:
        """Work on the encoded splits that needs the starting weights (DPO: reference log-probs)."""

    def attach(self, module) -> None:
        """Set up what the loss needs besides module.model (DPO: the frozen reference)."""

    def finetune_loss(self, module, batch: dict) -> torch.Tensor:
        raise ConfigError("task", f"{self.name} is not trained by bigml finetune")

    def finetune_score(self, module, scorer, batch: dict) -> None:
        raise NotImplementedError

    def scorer(self, label_names: list[str], ece_bins: int = 15, threshold: float = 0.5):
        raise NotImplementedError

    def batch_examples(self, batch: dict) -> int:
        return int(batch["labels"].shape[0])

    def batch_trained_tokens(self, batch: dict) -> int:
        """Tokens the loss trains on in this batch (padding and masked prompts excluded)."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    # -- scoring ------------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, cfg, split: str = "test", keep_rows: bool = False, **kw) -> Report:
        raise ConfigError("task", f"{self.name} models cannot be scored by bigml eval")

    def kd_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels, temperature: float) -> torch.Tensor:
        """Hinton et al.'s distillation loss on softened distributions (T^2-scaled)."""
        import torch.nn.functional as F

        T = temperature
        return F.kl_div(F.log_softmax(student_logits / T, -1), F.log_softmax(teacher_logits / T, -1), log_target=True,
                        reduction="batchmean") * T * T

    def __repr__(self) -> str:
        return f"<task {self.name}>"


# -- labeled text ---------------------------------------------------------------------------------

class Scorer:
    """A task's metrics accumulated over batches: `update(logits, labels)`, then `compute()`.
    Metrics are torchmetrics objects (no logits are kept)."""

    def __init__(self, task: LabeledTask, label_names: list[str], ece_bins: int = 15, threshold: float = 0.5):
        from torchmetrics import MeanMetric

        self.task, self.label_names, self.threshold = task, label_names, threshold
        self.loss = MeanMetric()
        self.metrics = task.build_metrics(label_names, ece_bins, threshold)
        self.count = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Update with a batch; returns the batch's predictions (class ids / 0-1 matrix / values)."""
        logits = logits.detach().float().cpu()
        labels = labels.detach().cpu()
        loss, preds, n = self.task.update_metrics(self.metrics, logits, labels, self.threshold)
        if n:
            self.loss.update(loss, weight=n)
        self.count += labels.shape[0]
        return preds

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            if not name.startswith("_"):
                out[name] = float(metric.compute())
        out.update(self.task.extra_metrics(self.metrics, out))
        out["loss"] = float(self.loss.compute()) if self.count else float("nan")
        out["examples"] = self.count
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}

    def per_class(self) -> list[dict[str, Any]]:
        return self.task.per_class(self.metrics, self.label_names)

    def confusion(self) -> torch.Tensor | None:
        return self.metrics["_confusion"].compute() if "_confusion" in self.metrics else None

    def reset(self) -> None:
        self.loss.reset()
        for m in self.metrics.values():
            m.reset()
        self.count = 0


def label_str(v) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def sort_names(names) -> list[str]:
    names = list(names)
    try:
        return sorted(names, key=lambda s: (float(s), s))
    except ValueError:
        return sorted(names)


def is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


class LabeledTask(Task):
    """Text (or a text pair) in, a label out. Raw labels: classification str, multilabel list[str],
    regression float, token list[str] (one tag per word, the text a list of words)."""

    auto_class_name = "AutoModelForSequenceClassification"
    finetunable = True
    endpoints = ("predict",)
    problem_type: ClassVar[str | None] = None
    peft_task_type: ClassVar[str] = "SEQ_CLS"
    stratify: ClassVar[bool] = False        # carved splits keep the label shares
    numeric_target: ClassVar[bool] = False  # a number, not labels (regression)
    class_weights: ClassVar[bool] = False   # finetune.class_weights applies
    min_labels: ClassVar[int] = 1

    # -- models --------------------------------------------------------------------------------
    def claims(self, config) -> bool:
        archs = list(getattr(config, "architectures", None) or [])
        return bool(archs) and archs[0].endswith(self.auto_class_name.removeprefix("AutoModelFor")) and self._claims_head(config)

    def _claims_head(self, config) -> bool:
        return True

    def check_model(self, model_task: Task, path: str, config) -> None:
        if model_task.language_model or not isinstance(model_task, LabeledTask):
            raise DataError(f"model.path={path}: a {model_task.name.replace('_', ' ')} model without a {self.name} head; "
                            f"finetune it first (bigml finetune model.path={path} task={self.name})")
        if model_task.numeric_target and not self.numeric_target:
            raise DataError(f"model.path={path}: a regression head cannot be scored as {self.name}; drop task={self.name}")
        if self.numeric_target and not model_task.numeric_target:
            raise DataError(f"model.path={path}: a {model_task.name} head ({config.num_labels} labels) cannot be scored "
                            f"as regression; evaluate a regression model or drop task=regression")

    def head_kwargs(self, label_names: list[str]) -> dict:
        kw = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {n: i for i, n in enumerate(label_names)}}
        if self.problem_type:
            kw["problem_type"] = self.problem_type
        return kw

    def student_config(self, student, teacher) -> None:
        student.num_labels = teacher.num_labels
        student.id2label, student.label2id = dict(teacher.id2label), dict(teacher.label2id)
        student.problem_type = getattr(teacher, "problem_type", None)

    def logits(self, output) -> torch.Tensor:
        return output.logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        import torch.nn.functional as F

        logits = logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), weight=class_weights,
                               ignore_index=-100)

    # -- raw data -------------------------------------------------------------------------------
    def read_splits(self, cfg, seed: int):
        from bigml.data import labeled

        return labeled.read_labeled(labeled.data_cfg_of(cfg), self, seed)

    def describe_labels(self, names: list[str]) -> str:
        return f"{len(names)} labels ({', '.join(names[:8])})" if names else "numeric target"

    def augment_training(self, train, cfg):
        """data.augment=[delete,swap,...]: data.augment_copies augmented copies of every training text
        (bigml.data.augment), made once with the run's seed; validation and test rows stay as they are."""
        from bigml.data.augment import TEXT_OPS, augment_rows, op_names

        ops = op_names(cfg.data.get("augment"), TEXT_OPS)
        if not ops:
            return train
        copies = int(cfg.data.get("augment_copies") or 1)
        out = augment_rows(train, ops, copies, int(cfg.seed))
        log.info("data.augment: %s -> %d training rows (%d + %d augmented copies of each)", "+".join(ops), len(out),
                 len(train), copies)
        return out

    def normalize_labels(self, ds, separator: str | None, where: str):
        """Labels (and texts) to the task's raw types."""
        import datasets

        def to_str(b):
            return {"label": [label_str(v) for v in b["label"]]}
        features = ds.features.copy()
        features["label"] = datasets.Value("string")
        return ds.map(to_str, batched=True, features=features)

    def label_names(self, ds) -> list[str]:
        return sort_names(set(ds["label"]))

    def seen_labels(self, ds) -> set[str]:
        return {x for row in ds["label"] for x in row}

    def check_labels(self, ds, label2id: dict[str, int], where: str, trained_on: str) -> None:
        """Labels the model cannot predict: one clear line (they would silently score as errors)."""
        unknown = sorted(self.seen_labels(ds) - set(label2id))
        if unknown:
            self._numeric_labels_hint(unknown, list(label2id), where)
            raise DataError(f"{where}: {len(unknown)} label(s) never seen in {trained_on}: {', '.join(unknown[:5])}; "
                            f"the model knows {', '.join(list(label2id)[:10])}")

    def _numeric_labels_hint(self, labels: list[str], names: list[str], where: str) -> None:
        """Classification only: fractional numbers where labels should be look like a regression target."""

    def check_training_labels(self, names: list[str], n_rows: int) -> None:
        if len(names) < self.min_labels:
            raise DataError(f"data: the training split has {len(names)} label(s) ({', '.join(names)}); "
                            f"{self.name} needs at least {self.min_labels}")

    def check_eval_labels(self, ds, names: list[str], where: str) -> None:
        """Before scoring: labels the model's head cannot be compared with."""

    def label_map_for_model(self, names: list[str], config) -> dict[str, int]:
        """label -> id for a model whose config may carry real names or transformers' LABEL_i defaults."""
        l2i = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        if l2i and not all(k == f"LABEL_{v}" for k, v in l2i.items()):
            return l2i
        n = int(getattr(config, "num_labels", len(names)))
        if names and all(is_number(x) and float(x).is_integer() for x in names):
            return {str(i): i for i in range(n)}
        return {name: i for i, name in enumerate(names)} if len(names) <= n else {f"LABEL_{i}": i for i in range(n)}

    def model_label_names(self, config) -> list[str]:
        id2label = getattr(config, "id2label", None) or {}
        n = int(getattr(config, "num_labels", len(id2label)))
        return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]

    # -- encoding and batching --------------------------------------------------------------
    def encode_labels(self, labels: list, label2id: dict[str, int]) -> list:
        return [label2id[v] for v in labels]

    def encode(self, ds, tokenizer, label2id: dict[str, int], max_length: int, where: str = "data"):
        """Tokenize (no padding: batches pad dynamically); count and report truncated texts."""
        has_pair = "text_pair" in ds.column_names
        truncated = [0]

        def fn(b):
            args = (b["text"], b["text_pair"]) if has_pair else (b["text"],)
            enc = tokenizer(*args, truncation=True, max_length=max_length)
            full = tokenizer(*args)["input_ids"]
            truncated[0] += sum(len(x) > max_length for x in full)
            out = dict(enc.items())
            out["labels"] = self.encode_labels(b["label"], label2id)
            out["length"] = [len(x) for x in enc["input_ids"]]
            return out

        return _finish_encoding(ds, fn, truncated, max_length, where)

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def collate_fn(self, tokenizer):
        """Rows -> a padded batch (the collator), labels in the dtype the loss wants."""
        base = self.collator(tokenizer)

        def collate(rows):
            return self.cast_labels(base(rows))

        return collate

    def cast_labels(self, batch):
        return batch

    # -- metrics -------------------------------------------------------------------------------
    def build_metrics(self, label_names: list[str], ece_bins: int, threshold: float) -> dict:
        raise NotImplementedError

    def update_metrics(self, metrics: dict, logits: torch.Tensor, labels: torch.Tensor, threshold: float):
        """(batch loss, predictions, items the loss averages over)."""
        raise NotImplementedError

    def extra_metrics(self, metrics: dict, values: dict[str, float]) -> dict[str, float]:
        return {}

    def per_class(self, metrics: dict, names: list[str]) -> list[dict[str, Any]]:
        return []

    def scorer(self, label_names: list[str], ece_bins: int = 15, threshold: float = 0.5) -> Scorer:
        return Scorer(self, label_names, ece_bins, threshold)

    def forward_logits(self, model, batch: dict) -> torch.Tensor:
        """The head's output for a batch (labels are not passed: losses are computed here, with class
        weights, also for quantized heads)."""
        return self.logits(model(**{k: v for k, v in batch.items() if k != "labels"}))

    def finetune_loss(self, module, batch):
        return self.loss(self.forward_logits(module.model, batch), batch["labels"], module.class_weights)

    def finetune_score(self, module, scorer, batch):
        scorer.update(self.forward_logits(module.model, batch), batch["labels"])

    def prediction_rows(self, logits: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, names: list[str]) -> list[dict]:
        raise NotImplementedError

    def training_batches(self, cfg, tokenizer, model, batch_size: int):
        """Shuffled training batches of cfg.data for a model of this task (compress: distillation and
        recovery), with the model's label order."""
        from bigml.data import labeled

        if cfg.data.get("kind") != "labeled":
            raise ConfigError("data", f"a {self.name} model trains on labeled data",
                              "use data=tweets | data=labeled data.path=<file>")
        names = self.model_label_names(model.config)
        splits, _ = labeled.load_labeled(cfg, self, tokenizer, label_names=names or None, splits=("train",),
                                         model_config=model.config)
        return labeled.make_loader(splits["train"], self.collate_fn(tokenizer), batch_size, shuffle=True,
                                   group_by_length=bool(cfg.data.get("group_by_length", True)), seed=int(cfg.seed))

    def evaluate(self, model, tokenizer, cfg, split: str = "test", keep_rows: bool = False, **kw) -> Report:
        from bigml.tasks._labeled_eval import evaluate

        return evaluate(self, model, tokenizer, cfg, split, keep_rows, **kw)

    # -- serving (bigml serve's /v1/predict) ----------------------------------------------------
    @torch.inference_mode()
    def predict(self, model, tokenizer, texts: list[str], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        """One answer per text (a JSON object: label and probabilities, a value, entities...)."""
        args = (texts, pairs) if pairs is not None else (texts,)
        enc = tokenizer(*args, padding=True, truncation=True, return_tensors="pt").to(model.device)
        logits = self.logits(model(**enc)).float().cpu()
        return self.answers(logits, self.model_label_names(model.config))

    def answers(self, logits: torch.Tensor, names: list[str]) -> list[dict[str, Any]]:
        """The head's output for a batch of texts, as the JSON objects /v1/predict returns."""
        raise NotImplementedError
    def encode_for_eval(self, model, tokenizer, cfg, split: str):
        """(encoded split, its raw rows, label names in the model's order) of cfg.data, for scoring."""
        from bigml.tasks._labeled_eval import encode_for_eval

        return encode_for_eval(self, model, tokenizer, cfg, split)

    def row_inputs(self, raw_rows) -> list[dict]:
        """What identifies each scored row in predictions.jsonl (its text)."""
        return [{"text": " ".join(t) if isinstance(t, list) else t} for t in raw_rows["text"]]


def _finish_encoding(ds, fn, truncated: list[int], max_length: int, where: str):
    from bigml.progress import Progress

    with Progress(f"{where}: encoding", total=len(ds), unit="rows") as progress:
        def counted(b):
            progress.update(len(b["label"]))
            return fn(b)

        out = ds.map(counted, batched=True, batch_size=512, remove_columns=list(ds.column_names), load_from_cache_file=False)
    if truncated[0]:
        log.warning("%s: %d of %d texts are longer than %d tokens and were truncated (raise data.max_length "
                    "or eval.max_length, up to the model's maximum)", where, truncated[0], len(ds), max_length)
    out.truncated = truncated[0]  # type: ignore[attr-defined]
    return out


# -- language models ------------------------------------------------------------------------------

class LanguageModelTask(Task):
    """Text in, text out: pretrained on packed blocks of a corpus, scored by loss per token."""

    language_model = True
    objective: ClassVar[str] = ""            # metrics.json "objective" of pretraining: causal | masked
    metrics = ("loss", "perplexity", "bits_per_byte", "tokens")
    headline_metric = "perplexity"
    special_tokens: ClassVar[dict[str, str]] = {}
    default_tokenizer: ClassVar[str] = "bpe"  # tokenizer.kind=auto
    model_input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")  # what its tokenizer returns
    mapping_names: ClassVar[str] = ""        # transformers' MODEL_FOR_*_MAPPING_NAMES of its families

    def pretrains(self, config) -> bool:
        """Whether this is the objective a model family (any head) pretrains with."""
        from transformers.models.auto import modeling_auto

        if config.model_type in getattr(modeling_auto, self.mapping_names):
            return True
        # architectures registered with the auto class at run time (bigml.models.classic: model=lstm)
        return type(config) in getattr(self.auto_class._model_mapping, "_extra_content", {})

    def post_processor(self, tok):
        """A `tokenizers` post-processor wrapping each document (None: documents as they are)."""
        return None

    extra_validation_metrics: ClassVar[tuple[str, ...]] = ()  # more val_<name> keys of pretraining (nsp_accuracy)

    def for_objective(self, objective) -> LanguageModelTask:
        """The task that pretrains with `objective` (pretrain's objective=): this one by default."""
        if objective in (None, "auto", self.objective):
            return self
        raise ConfigError("objective", f"{objective!r} is not an objective of {self.name.replace('_', ' ')} models",
                          "use objective=auto" + (" or mlm+nsp (BERT-style encoders)" if self.objective != "causal" else ""))

    def validation_extras(self, model, inputs, labels) -> dict[str, tuple[torch.Tensor, int]]:
        """Values (mean, weight) of extra_validation_metrics for one validation batch."""
        return {}

    def check_tokenizer(self, tokenizer, where: str) -> None:
        """Raise DataError when the tokenizer lacks a token the objective needs."""

    def config_special_ids(self, tokenizer) -> dict[str, int | None]:
        """Special token ids a from-scratch model's config records."""
        return {"pad_token_id": tokenizer.pad_token_id}

    def document_separator(self, tokenizer) -> list[int]:
        """Token ids appended after every document when packing a corpus."""
        return []

    def inputs_and_labels(self, batch: torch.Tensor, seed: int, *, mask_token_id: int | None, special_ids: torch.Tensor,
                          probability: float, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def n_targets(self, labels: torch.Tensor) -> int:
        raise NotImplementedError

    def loss_and_logits(self, model, inputs: torch.Tensor, labels: torch.Tensor):
        """(loss, logits of the scored positions, their labels)."""
        raise NotImplementedError

    def training_loss(self, model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_and_logits(model, inputs, labels)[0]

    def accuracy_reported(self) -> bool:
        return False

    def score_block(self, model, ids: torch.Tensor, batch_index: int, **kw) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(mean loss, scored targets, hits or None) of one batch of corpus blocks."""
        raise NotImplementedError

    def training_batches(self, cfg, tokenizer, model, batch_size: int):
        """Shuffled blocks of the packed corpus cfg.data (compress: distillation and recovery)."""
        from torch.utils.data import DataLoader

        from bigml.data import sources
        from bigml.data.labeled import model_max_length
        from bigml.data.packed import PackedBlocks, ResumableSampler, pack_corpus

        if cfg.data.get("kind") != "corpus":
            raise ConfigError("data", f"a {self.name.replace('_', ' ')} trains on a text corpus, not labeled data",
                              "use data=python-stdlib | data=shakespeare | data=text data.path=<text files>")
        files = sources.corpus_files(cfg.data)
        key = sources.fingerprint(cfg.data, files)
        block = int(cfg.data.get("block_size") or 128)
        limit = model_max_length(tokenizer, model.config)
        block = min(block, limit) if limit else block
        info, _ = pack_corpus(cfg.data, tokenizer, self, lambda: sources.load_documents(cfg.data, files), key,
                              str(cfg.cache_dir), int(cfg.seed), float(cfg.data.get("val_fraction") or 0.05))
        blocks = PackedBlocks(info, 0, info.n_train, block)
        if len(blocks) < batch_size:
            raise DataError(f"data: {len(blocks)} training blocks of {block} tokens, fewer than a batch of {batch_size}")
        return DataLoader(blocks, batch_size=batch_size, sampler=ResumableSampler(len(blocks), int(cfg.seed)), drop_last=True)

    def evaluate(self, model, tokenizer, cfg, split: str = "test", keep_rows: bool = False, **kw) -> Report:
        from bigml.tasks._corpus_eval import evaluate

        return Report(self.name, evaluate(self, model, tokenizer, cfg))

    def generate(self, cfg, model, tokenizer, records, single: bool, field_name: str, stops, dtype) -> dict:
        raise ConfigError("model.path", f"{self.name} models do not generate text")
