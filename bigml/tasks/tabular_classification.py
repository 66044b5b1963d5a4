"""Tabular classification: a class per row of numeric feature columns (model=linear: multinomial
logistic regression; model=mlp: dense layers with dropout). `task=classification` picks it when the
model and data are a table (bigml.data.modality)."""

from __future__ import annotations

from bigml.tasks._tabular import TabularInputs
from bigml.tasks.classification import Classification


class TabularClassification(TabularInputs, Classification):
    name = "tabular-classification"
    summary = "a class per row of numeric columns (model=linear | mlp; AutoModel, bigml_tabular)"
    infer_priority = 26


TASK = TabularClassification()
