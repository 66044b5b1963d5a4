"""Single-label classification: one label per text (or text pair); softmax over the labels."""

from __future__ import annotations

from typing import Any

import torch

from bigml.errors import DataError
from bigml.tasks.base import LabeledTask, is_number


class Classification(LabeledTask):
    name = "classification"
    summary = "one label per text (AutoModelForSequenceClassification)"
    metrics = ("accuracy", "f1_macro", "f1_micro", "f1_weighted", "precision_macro", "recall_macro", "ece", "loss")
    metric = "f1_macro"
    headline_metric = "accuracy"
    problem_type = "single_label_classification"
    stratify = True
    class_weights = True
    min_labels = 2
    infer_priority = 30
    ensembles = True

    def for_config(self, cfg):
        """Images or table rows when the model and data hold them (bigml.data.modality)."""
        from bigml.data.modality import input_kind
        from bigml.tasks import get_task

        kind = input_kind(cfg)
        return self if kind == "text" else get_task(f"{kind}-classification").for_config(cfg)

    def combine_outputs(self, outputs):
        """The members' probabilities averaged (returned as log-probabilities: softmax gives them back)."""
        probs = torch.stack([o.float().softmax(-1) for o in outputs]).mean(0)
        return probs.clamp_min(1e-12).log()

    def _claims_head(self, config) -> bool:
        pt = getattr(config, "problem_type", None)
        if pt in ("regression", "multi_label_classification"):
            return False
        return not (pt is None and int(getattr(config, "num_labels", 2)) == 1)

    def seen_labels(self, ds) -> set[str]:
        return set(ds["label"])

    def _numeric_labels_hint(self, labels, names, where) -> None:
        if all(is_number(u) for u in labels) and any(not float(u).is_integer() for u in labels):
            raise DataError(f"{where}: labels like {labels[0]} are numbers, but the model is a classification head "
                            f"({', '.join(names[:6])}); use a regression model, or task=regression")

    def check_training_labels(self, names: list[str], n_rows: int) -> None:
        super().check_training_labels(names, n_rows)
        if len(names) > 0.5 * n_rows and all(is_number(x) for x in names):
            raise DataError(f"data: {len(names)} distinct numeric labels in {n_rows} rows look like a regression "
                            f"target; use task=regression")

    def check_eval_labels(self, ds, names: list[str], where: str) -> None:
        values = ds.unique("label")
        if all(is_number(x) for x in values) and any(not float(x).is_integer() for x in values[:50]):
            raise DataError(f"{where}: labels like {ds['label'][0]} are numbers, but the model is a "
                            f"classification head ({', '.join(names[:6])}); use a regression model")

    def build_metrics(self, label_names, ece_bins, threshold) -> dict:
        from torchmetrics import classification as C

        n = len(label_names)
        if n < 2:
            raise DataError("classification needs at least 2 labels")
        return {"accuracy": C.MulticlassAccuracy(n, average="micro"),
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

    def update_metrics(self, metrics, logits, labels, threshold):
        loss = torch.nn.functional.cross_entropy(logits, labels.long())
        probs = logits.softmax(-1)
        for metric in metrics.values():
            metric.update(probs, labels.long())
        return loss, probs.argmax(-1), labels.numel()

    def per_class(self, metrics, names) -> list[dict[str, Any]]:
        p, r, f = (metrics[k].compute().tolist() for k in ("_precision", "_recall", "_f1"))
        support = metrics["_confusion"].compute().sum(1).tolist()
        return [{"label": name, "precision": p[i], "recall": r[i], "f1": f[i], "support": support[i]}
                for i, name in enumerate(names)]

    def prediction_rows(self, logits, preds, labels, names):
        probs = logits.softmax(-1)
        return [{"label": names[y], "predicted": names[p], "probabilities": {names[i]: round(v, 6) for i, v in enumerate(pr)}}
                for p, y, pr in zip(preds.tolist(), labels.tolist(), probs.tolist(), strict=False)]

    def answers(self, logits, names):
        probs = logits.softmax(-1).tolist()
        return [{"label": names[max(range(len(row)), key=row.__getitem__)], "score": round(max(row), 6),
                 "probabilities": {names[i]: round(v, 6) for i, v in enumerate(row)}} for row in probs]


TASK = Classification()
