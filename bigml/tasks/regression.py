"""Regression: one number per text; a one-output head trained with MSE."""

from __future__ import annotations

import math

import torch

from bigml.errors import DataError
from bigml.tasks.base import LabeledTask


class Regression(LabeledTask):
    name = "regression"
    summary = "one number per text (a one-output head, MSE loss)"
    metrics = ("mse", "rmse", "mae", "r2", "pearson", "spearman", "loss")
    metric = "mse"
    headline_metric = "mse"
    problem_type = "regression"
    numeric_target = True
    infer_priority = 10
    ensembles = True

    def for_config(self, cfg):
        """A table of numbers when the model and data are one (bigml.data.modality)."""
        from bigml.data.modality import input_kind
        from bigml.errors import ConfigError
        from bigml.tasks import get_task

        kind = input_kind(cfg)
        if kind == "image":
            raise ConfigError("task", "regression on images is not supported", "use task=image-classification")
        return self if kind == "text" else get_task("tabular-regression").for_config(cfg)

    def combine_outputs(self, outputs):
        return torch.stack([o.float().reshape(-1) for o in outputs]).mean(0)

    def _claims_head(self, config) -> bool:
        pt = getattr(config, "problem_type", None)
        return pt == "regression" or (pt is None and int(getattr(config, "num_labels", 2)) == 1)

    def head_kwargs(self, label_names):
        return {"num_labels": 1, "problem_type": "regression"}

    def normalize_labels(self, ds, separator, where):
        import datasets

        def to_float(b):
            out = []
            for v in b["label"]:
                try:
                    out.append(float(v))
                except (TypeError, ValueError):
                    raise DataError(f"{where}: label {v!r} is not a number; regression needs numeric labels "
                                    f"(use task=classification for categories)") from None
            return {"label": out}
        features = ds.features.copy()
        features["label"] = datasets.Value("float64")
        return ds.map(to_float, batched=True, features=features)

    def label_names(self, ds) -> list[str]:
        return []

    def check_labels(self, ds, label2id, where, trained_on) -> None:
        pass

    def check_training_labels(self, names, n_rows) -> None:
        pass

    def label_map_for_model(self, names, config) -> dict[str, int]:
        return {}

    def model_label_names(self, config) -> list[str]:
        return []

    def encode_labels(self, labels, label2id):
        return [float(v) for v in labels]

    def cast_labels(self, batch):
        batch["labels"] = batch["labels"].float()
        return batch

    def logits(self, output):
        return output.logits.reshape(-1)

    def loss(self, logits, labels, class_weights=None):
        return torch.nn.functional.mse_loss(logits.float(), labels.float())

    def build_metrics(self, label_names, ece_bins, threshold):
        from torchmetrics import regression as R

        return {"mse": R.MeanSquaredError(), "mae": R.MeanAbsoluteError(), "r2": R.R2Score(),
                "pearson": R.PearsonCorrCoef(), "spearman": R.SpearmanCorrCoef()}

    def update_metrics(self, metrics, logits, labels, threshold):
        values = logits.reshape(-1)
        target = labels.reshape(-1).float()
        for metric in metrics.values():
            metric.update(values, target)
        return torch.nn.functional.mse_loss(values, target), values, target.numel()

    def extra_metrics(self, metrics, values):
        return {"rmse": math.sqrt(values["mse"])}

    def prediction_rows(self, logits, preds, labels, names):
        return [{"label": y, "predicted": p, "probabilities": None}
                for p, y in zip(preds.tolist(), labels.reshape(-1).tolist(), strict=False)]

    def kd_loss(self, student_logits, teacher_logits, labels, temperature):
        return torch.nn.functional.mse_loss(student_logits, teacher_logits)  # no distribution to soften

    def answers(self, logits, names):
        return [{"value": round(float(v), 6)} for v in logits.reshape(-1).tolist()]


TASK = Regression()
