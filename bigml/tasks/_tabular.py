"""What tabular classification and regression share: rows of numeric feature columns in, read by
bigml.data.tabular, fed to bigml's tabular network (model=linear | mlp; AutoModel, model_type
bigml_tabular) whose weights hold the training split's standardization."""

from __future__ import annotations

import logging

import numpy as np
import torch

from bigml.errors import ConfigError, DataError
from bigml.tasks.image_classification import read_model_config, require_input

log = logging.getLogger("bigml")


class TabularInputs:
    """Mixin, before Classification / Regression in the bases: the inputs side of a tabular task."""

    auto_class_name = "AutoModel"
    compressible = False

    def claims(self, config) -> bool:
        return getattr(config, "model_type", None) == "bigml_tabular" and self._claims_head(config)

    def for_config(self, cfg):
        require_input(cfg, "tabular", self.name, "a table of numbers",
                      "use model=linear | model=mlp with data.path=<CSV / parquet of numeric columns>", "tabular models")
        return self

    # -- data ----------------------------------------------------------------------------------
    def read_splits(self, cfg, seed: int):
        from bigml.data.tabular import read_table

        names = None
        if cfg.model.get("path"):  # continue training a tabular model: its own feature columns
            names = list(read_model_config(str(cfg.model.path)).feature_names or [])
        return read_table(cfg.data, self, seed, str(cfg.cache_dir), feature_names=names,
                          label_column=self._label_column(cfg))

    @staticmethod
    def _label_column(cfg) -> str:
        """data.label_column; for your own file (data.path given) `label` unless data.label_column is
        set, because the data preset's label column names a column of its own file (finetune's
        default data=tweets says `sentiment`)."""
        from bigml.models.presets import command_line_keys

        given = command_line_keys()
        if "data.path" in given and "data.label_column" not in given:
            return "label"
        return str(cfg.data.get("label_column") or "label")

    def preprocessor_and_config(self, cfg, raw):
        from bigml.data.tabular import TableInputs, standardization
        from bigml.models.presets import tabular_config

        inputs = TableInputs(raw.feature_names, raw.label_column)
        if cfg.model.get("path"):
            return inputs, read_model_config(str(cfg.model.path)), None
        features = np.asarray(raw.train["features"], dtype=np.float64)
        targets = np.asarray(raw.train["label"], dtype=np.float64) if self.numeric_target else None
        stats = standardization(features, targets)  # fitted on the training split only
        config = tabular_config(cfg.model, raw.feature_names, raw.label_column, self.head_kwargs(raw.label_names), stats)
        log.info("data: %d numeric feature columns (%s), standardized with the training split's mean and std",
                 len(raw.feature_names), ", ".join(raw.feature_names[:8]) + (", ..." if len(raw.feature_names) > 8 else ""))
        return inputs, None, config.to_dict()

    def load_preprocessor(self, path: str, key: str = "model.path"):
        from bigml.data.tabular import TableInputs

        config = read_model_config(path, key)
        return TableInputs(list(config.feature_names or []), config.label_column or "label")

    def prepare_tokenizer(self, tokenizer, cfg) -> None:
        pass

    def describe_labels(self, names):
        return super().describe_labels(names)

    def encode(self, ds, tokenizer, label2id, max_length, where="data"):
        from bigml.data.tabular import TableTensors

        features = np.asarray(ds["features"], dtype=np.float32).reshape(len(ds), -1)
        return TableTensors(features, self.encode_labels(ds["label"], label2id), self.numeric_target)

    def collate_fn(self, tokenizer):
        from bigml.data.tabular import identity

        return identity

    def train_loader(self, encoded, tokenizer, cfg):
        return torch.utils.data.DataLoader(encoded, batch_size=int(cfg.data.batch_size), shuffle=True,
                                           generator=torch.Generator().manual_seed(int(cfg.seed)),
                                           collate_fn=self.collate_fn(tokenizer))

    def eval_loader(self, encoded, tokenizer, batch_size):
        return torch.utils.data.DataLoader(encoded, batch_size=batch_size, shuffle=False,
                                           collate_fn=self.collate_fn(tokenizer))

    def batch_trained_tokens(self, batch) -> int:
        return 0

    def augment_training(self, train, cfg):
        if cfg.data.get("augment"):
            raise ConfigError("data.augment", "tables of numbers have no augmentation here", "drop data.augment")
        return train

    # -- scoring -------------------------------------------------------------------------------
    def encode_for_eval(self, model, tokenizer, cfg, split):
        from bigml.data.tabular import read_table
        from bigml.tasks._labeled_eval import resolve_split

        names = self.model_label_names(model.config)
        raw = read_table(cfg.data, self, int(cfg.get("seed", 0)), str(cfg.cache_dir),
                         feature_names=tokenizer.feature_names, need_train=False,
                         label_column=self._eval_label_column(cfg, model.config))
        split = resolve_split(cfg, raw) if split == "auto" else split
        ds = raw.get(split)
        label2id = {n: i for i, n in enumerate(names)}
        self.check_labels(ds, label2id, f"data ({split} split)", "the model's labels")
        return self.encode(ds, tokenizer, label2id, 0), ds, names

    def _eval_label_column(self, cfg, config) -> str:
        """data.label_column when set on the command line or by a built-in table, else the column the
        model was trained on (it is recorded in its config)."""
        from bigml.models.presets import command_line_keys

        if "data.label_column" in command_line_keys() or not cfg.data.get("path"):
            return str(cfg.data.get("label_column") or "label")
        return str(config.label_column or cfg.data.get("label_column") or "label")

    def row_inputs(self, raw_rows):
        return [{"row": i} for i in range(len(raw_rows))]

    def check_eval_labels(self, ds, names, where) -> None:
        if not len(ds):
            raise DataError(f"{where}: no rows")
