"""A split held as tensors (images, table rows): the few things a DataLoader and bigml's loaders ask
of a dataset, written once for every tensor-backed split."""

from __future__ import annotations

import torch


class TensorRows(torch.utils.data.Dataset):
    """Inputs (N, ...) in the attribute `input_attr`, labels (N,) in `labels`. `__getitems__` lets a
    DataLoader fetch a whole batch with one indexing operation; `ds["labels"]` reads the column as a
    datasets.Dataset would (class weights count labels)."""

    input_attr: str = "inputs"     # the attribute holding the inputs
    batch_key: str = "inputs"      # ... and their key in a batch
    columns: tuple[str, ...] = ("inputs", "labels")
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if isinstance(i, str):
            if i == "labels":
                return self.labels.tolist()
            raise KeyError(i)
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {self.batch_key: getattr(self, self.input_attr)[idx], "labels": self.labels[idx]}

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)
