"""Multi-label classification: any number of labels per text (a separator-joined cell or a JSON
list); one sigmoid per label, predicted where it reaches task.threshold."""

from __future__ import annotations

from typing import Any

import torch

from bigml.tasks.base import LabeledTask, sort_names


class Multilabel(LabeledTask):
    name = "multilabel"
    summary = "any number of labels per text (sigmoid outputs)"
    metrics = ("accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro", "loss")
    metric = "f1_macro"
    headline_metric = "accuracy"
    problem_type = "multi_label_classification"
    infer_priority = 20
    ensembles = True

    def combine_outputs(self, outputs):
        """The members' per-label probabilities averaged (returned as logits: sigmoid gives them back)."""
        probs = torch.stack([o.float().sigmoid() for o in outputs]).mean(0).clamp(1e-6, 1 - 1e-6)
        return torch.log(probs) - torch.log1p(-probs)

    def _claims_head(self, config) -> bool:
        return getattr(config, "problem_type", None) == "multi_label_classification"

    def normalize_labels(self, ds, separator, where):
        import datasets

        sep = separator or ","

        def to_list(b):
            return {"label": [[str(x).strip() for x in (v if isinstance(v, list) else str(v).split(sep)) if str(x).strip()]
                              for v in b["label"]]}
        features = ds.features.copy()
        features["label"] = datasets.Sequence(datasets.Value("string"))
        return ds.map(to_list, batched=True, features=features)

    def label_names(self, ds) -> list[str]:
        return sort_names({x for row in ds["label"] for x in row})

    def encode_labels(self, labels, label2id):
        rows = []
        for row in labels:
            vec = [0.0] * len(label2id)
            for x in row:
                vec[label2id[x]] = 1.0
            rows.append(vec)
        return rows

    def cast_labels(self, batch):
        batch["labels"] = batch["labels"].float()
        return batch

    def loss(self, logits, labels, class_weights=None):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def build_metrics(self, label_names, ece_bins, threshold) -> dict:
        from torchmetrics import classification as C

        n = len(label_names)
        return {"accuracy": C.MultilabelExactMatch(n, threshold=threshold),
                "f1_macro": C.MultilabelF1Score(n, average="macro", threshold=threshold),
                "f1_micro": C.MultilabelF1Score(n, average="micro", threshold=threshold),
                "precision_macro": C.MultilabelPrecision(n, average="macro", threshold=threshold),
                "recall_macro": C.MultilabelRecall(n, average="macro", threshold=threshold),
                "_precision": C.MultilabelPrecision(n, average=None, threshold=threshold),
                "_recall": C.MultilabelRecall(n, average=None, threshold=threshold),
                "_f1": C.MultilabelF1Score(n, average=None, threshold=threshold)}

    def update_metrics(self, metrics, logits, labels, threshold):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
        probs = logits.sigmoid()
        for metric in metrics.values():
            metric.update(probs, labels.long())
        return loss, (probs >= threshold).long(), labels.shape[0]

    def per_class(self, metrics, names) -> list[dict[str, Any]]:
        p, r, f = (metrics[k].compute().tolist() for k in ("_precision", "_recall", "_f1"))
        return [{"label": name, "precision": p[i], "recall": r[i], "f1": f[i], "support": None}
                for i, name in enumerate(names)]

    def prediction_rows(self, logits, preds, labels, names):
        probs = logits.sigmoid()
        return [{"label": [names[i] for i, v in enumerate(y) if v >= 0.5],
                 "predicted": [names[i] for i, v in enumerate(p) if v],
                 "probabilities": {names[i]: round(v, 6) for i, v in enumerate(pr)}}
                for p, y, pr in zip(preds.tolist(), labels.tolist(), probs.tolist(), strict=False)]

    def kd_loss(self, student_logits, teacher_logits, labels, temperature):
        T = temperature  # independent sigmoids: match the teacher's softened probabilities
        return torch.nn.functional.binary_cross_entropy_with_logits(
            student_logits / T, torch.sigmoid(teacher_logits / T)) * T * T

    def answers(self, logits, names, threshold: float = 0.5):
        probs = logits.sigmoid().tolist()
        return [{"labels": [names[i] for i, v in enumerate(row) if v >= threshold],
                 "probabilities": {names[i]: round(v, 6) for i, v in enumerate(row)}} for row in probs]


TASK = Multilabel()
