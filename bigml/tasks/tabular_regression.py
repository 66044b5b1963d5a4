"""Tabular regression: a number per row of numeric feature columns (model=linear: linear regression;
model=mlp: dense layers with dropout). Targets are standardized on the training split inside the
model, which predicts in the target's own units. `task=regression` picks it when the model and data
are a table (bigml.data.modality)."""

from __future__ import annotations

from bigml.tasks._tabular import TabularInputs
from bigml.tasks.regression import Regression


class TabularRegression(TabularInputs, Regression):
    name = "tabular-regression"
    summary = "a number per row of numeric columns (model=linear | mlp; AutoModel, bigml_tabular)"
    infer_priority = 6


TASK = TabularRegression()
