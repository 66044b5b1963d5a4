"""Tables of numbers for tabular classification and regression (model=linear | mlp).

    read_table(data_cfg, task, seed, feature_names=None) -> labeled.RawSplits whose rows hold
        `features` (a list of floats, data.feature_columns in order) and `label`
    TableInputs      feature names and label column (what the recipe carries instead of a tokenizer)
    TableTensors     an encoded split: float32 features and labels, fetched a batch at a time
    sklearn_table    scikit-learn's bundled tables (diabetes, wine, breast-cancer) as CSV files

Files are read like labeled text (CSV / TSV / JSONL / parquet, bigml.data.labeled); every feature
column must be numeric, and a missing value is refused with its column and row, never guessed.
Standardization is not done here: it is fitted on the training split and kept in the model's
weights (bigml.models.classic.BigmlTabularModel), so a saved model takes raw values.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch

from bigml.data.tensor_rows import TensorRows
from bigml.errors import ConfigError, DataError

# name -> (scikit-learn loader, whether the target is a class)
SKLEARN_TABLES = {"diabetes": ("load_diabetes", False), "wine": ("load_wine", True),
                  "breast-cancer": ("load_breast_cancer", True)}
_NUMERIC = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64",
            "bool")


def sklearn_table(name: str, cache_dir: str) -> Path:
    """scikit-learn's bundled table `name` written once as CSV (feature columns + `target`; class
    names for classification) under the cache directory."""
    if name not in SKLEARN_TABLES:
        raise ConfigError("data.path", f"data={name} needs a path", "set data.path=<CSV / parquet file>")
    try:
        import sklearn.datasets as sk
    except ImportError:
        raise DataError(f"data={name} needs scikit-learn (it ships the table): pip install scikit-learn") from None
    loader, classes = SKLEARN_TABLES[name]
    out = Path(cache_dir).expanduser() / "tables" / f"{name}.csv"
    if out.is_file():
        return out
    bunch = getattr(sk, loader)(as_frame=True)
    frame = bunch.frame.copy()
    if classes:
        frame["target"] = [str(bunch.target_names[int(y)]) for y in frame["target"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(out)
    return out


def select_features(ds: datasets.Dataset, data_cfg, where: str, feature_names: list[str] | None,
                    label_column: str) -> tuple[datasets.Dataset, list[str]]:
    """Rows -> `features` (floats, in feature order) and `label`, refusing non-numeric feature
    columns and missing values by name. Returns the rows and the feature names."""
    columns = list(ds.column_names)
    if label_column not in columns:
        raise DataError(f"data.label_column={label_column}: no such column in {where}; it has {', '.join(columns)}")
    given = data_cfg.get("feature_columns")
    names = list(feature_names or (list(given) if given else [c for c in columns if c != label_column]))
    missing = [c for c in names if c not in columns]
    if missing:
        what = "the model's feature column" if feature_names else "data.feature_columns:"
        raise DataError(f"{where}: {what} {missing[0]!r} is not in the data; it has {', '.join(columns)}")
    if label_column in names:
        raise ConfigError("data.feature_columns", f"the label column {label_column!r} is also a feature")
    if not names:
        raise DataError(f"{where}: no feature columns besides the label {label_column!r}")
    for c in names:
        dtype = getattr(ds.features[c], "dtype", None)
        if dtype not in _NUMERIC:
            sample = next((v for v in ds[c][:50] if v is not None), None)
            raise DataError(f"{where}: feature column {c!r} is not numeric (values like {sample!r}); "
                            f"encode it as numbers, or leave it out with data.feature_columns=[...]")
    values = ds.select_columns(names).to_pandas()[names].to_numpy(dtype=np.float64)
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        r, c = bad[0]
        raise DataError(f"{where}: {len(bad)} missing or non-finite value(s) in the features (first: column "
                        f"{names[c]!r}, row {r + 1}); fill or drop them")
    rows = datasets.Dataset.from_dict(
        {"features": values.astype(np.float32), "label": ds[label_column]},
        features=datasets.Features({"features": datasets.Sequence(datasets.Value("float32")),
                                    "label": ds.features[label_column]}))
    return rows, names


def read_table(data_cfg, task, seed: int, cache_dir: str, feature_names: list[str] | None = None,
               need_train: bool = True, label_column: str | None = None):
    """Train / val / test rows of a table (labeled.read_table_splits: files, carving, built-ins),
    labels normalized by the task (class names, or numbers for regression). The RawSplits also
    carry `feature_names` and `label_column`."""
    from bigml.data.labeled import read_table_splits

    label_column = label_column or str(data_cfg.get("label_column") or "label")
    chosen: list[str] = []

    def prepare(ds, where, path):
        if path is not None and Path(str(path)).expanduser().is_dir():
            raise DataError(f"{where}: a folder; a table of numbers is one CSV / TSV / JSONL / parquet file (or a glob)")
        rows, names = select_features(ds, data_cfg, where, feature_names or chosen or None, label_column)
        chosen[:] = names  # the first file fixes the features; the other splits must have them
        missing = [i for i, v in enumerate(rows["label"]) if v is None or (isinstance(v, str) and not v.strip())]
        if missing:
            raise DataError(f"{where}: {len(missing)} rows have no label (first: row {missing[0] + 1}); fill or drop them")
        return task.normalize_labels(rows, None, where)

    raw = read_table_splits(data_cfg, seed, prepare, need_train=need_train, stratify=task.stratify,
                            builtin=lambda name: sklearn_table(name, cache_dir))
    some = raw.train if raw.train is not None else (raw.test if raw.test is not None else raw.all)
    raw.label_names = task.label_names(some) if some is not None else []
    raw.feature_names, raw.label_column = list(chosen), label_column
    return raw


class TableInputs:
    """What the finetune recipe carries where text tasks carry a tokenizer: the feature columns, in
    the model's order, and the label column. Nothing to save: the model's config holds both."""

    pad_token_id = None

    def __init__(self, feature_names: list[str], label_column: str):
        self.feature_names, self.label_column = list(feature_names), label_column

    def save_pretrained(self, path) -> None:
        pass


class TableTensors(TensorRows):
    """float32 features (N, F) and labels."""

    input_attr, batch_key, columns = "features", "features", ("features", "labels")

    def __init__(self, features: np.ndarray, labels: list, float_labels: bool):
        self.features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        self.labels = torch.tensor(labels, dtype=torch.float32 if float_labels else torch.long)
        self.truncated = 0


def standardization(features: np.ndarray, targets: np.ndarray | None) -> dict:
    """Mean and std of each feature column (and of a regression target) on the training split;
    constant columns get std 1 (they are centered, not blown up)."""
    mean = features.mean(0)
    std = features.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    out = {"feature_mean": [float(v) for v in mean], "feature_std": [float(v) for v in std]}
    if targets is not None:
        t_std = float(targets.std())
        out.update(target_mean=float(targets.mean()), target_std=t_std if t_std > 1e-12 else 1.0)
    return out


def identity(batch):
    return batch
