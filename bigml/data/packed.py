"""Pretraining data: a corpus tokenized once, packed into one memory-mapped token file.

    documents --shuffle(seed)--> tokenize (batched, cached) --> [doc][sep][doc][sep]... --> tokens.bin
    tokens.bin = | train tokens ......................................... | validation tokens |

Training reads fixed-length blocks straight from the memory map, so resident memory stays flat as
the corpus grows. The validation split is the tail of the shuffled stream (as in nanoGPT), so at
most one document straddles the two splits.

The loader is resumable: Lightning saves its `state_dict()` (epoch, batches consumed) in every
checkpoint, and `resume` continues at the next unseen batch of the same permutation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bigml.atomic import atomic_directory
from bigml.data.cache import build_lock, open_cached
from bigml.errors import DataError
from bigml.progress import Progress

log = logging.getLogger(__name__)
_FORMAT_VERSION = 1


@dataclass
class PackedCorpusInfo:
    path: Path
    dtype: str
    n_tokens: int
    n_train: int  # tokens [0, n_train) are training data, [n_train, n_tokens) validation
    n_documents: int
    n_bytes: int  # UTF-8 bytes of text, for bits-per-byte

    bad_rows_skipped: int = 0  # malformed rows dropped when the corpus was read (data.on_bad_rows=skip)

    @classmethod
    def read(cls, directory: Path) -> PackedCorpusInfo:
        """The corpus in `directory`, checked for a consistent size (a damaged entry raises)."""
        meta = json.loads((directory / "meta.json").read_text())
        info = cls(path=directory / "tokens.bin", bad_rows_skipped=int(meta.get("bad_rows_skipped", 0)),
                   **{k: meta[k] for k in ("dtype", "n_tokens", "n_train", "n_documents", "n_bytes")})
        expected = info.n_tokens * np.dtype(info.dtype).itemsize
        if info.path.stat().st_size != expected:
            raise ValueError(f"tokens.bin holds {info.path.stat().st_size} bytes, meta.json says {expected}")
        return info

    def memmap(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))


def default_num_proc(requested) -> int:
    if requested:
        return max(1, int(requested))
    return 1  # the Rust tokenizer already uses every core inside one process


def pack_corpus(data_cfg, tokenizer, task, documents_factory, corpus_key: str,
                cache_dir: str, seed: int, val_fraction: float) -> tuple[PackedCorpusInfo, bool]:
    """Tokenize and pack the corpus for `task` (a LanguageModelTask: its document separator), or
    reuse the cached result. Returns (info, from_cache)."""
    tok_id = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
    key = hashlib.sha256(json.dumps(
        dict(corpus=corpus_key, tok=tok_id, objective=task.objective, seed=seed, val=val_fraction, v=_FORMAT_VERSION),
        sort_keys=True).encode()).hexdigest()[:16]
    where = Path(cache_dir).expanduser() / "corpora" / key
    with build_lock(where):  # a second run that needs the same corpus waits, then reads it
        info = open_cached(where, PackedCorpusInfo.read, "tokenized corpus")
        if info is not None:
            return info, True
        return _pack(data_cfg, tokenizer, task, documents_factory, where, seed, val_fraction), False


def _pack(data_cfg, tokenizer, task, documents_factory, where: Path, seed: int, val_fraction: float) -> PackedCorpusInfo:
    t0 = time.perf_counter()
    docs = documents_factory()
    skipped = int(getattr(docs, "bad_rows_skipped", 0))  # data.on_bad_rows=skip (bigml.data.bad_rows)
    docs = docs.shuffle(seed=seed)
    sep = task.document_separator(tokenizer)
    num_proc = default_num_proc(data_cfg.get("num_proc"))
    if num_proc > 1:
        # Forked workers and the Rust thread pool don't mix; each worker then tokenizes on one thread.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    progress = Progress("tokenizing the corpus", total=len(docs), unit="documents")

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=True, verbose=False)["input_ids"]
        ids = [x + sep for x in ids]
        progress.update(len(ids))  # (in the worker processes with num_proc > 1: not shown)
        return {"ids": ids, "n": [len(x) for x in ids], "n_bytes": [len(t.encode("utf-8")) for t in batch["text"]]}

    with progress:
        tokenized = docs.map(encode, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                             remove_columns=["text"], desc="tokenizing")
    lengths = np.asarray(tokenized["n"], dtype=np.int64)
    n_tokens = int(lengths.sum())
    n_bytes = int(np.asarray(tokenized["n_bytes"], dtype=np.int64).sum())
    dtype = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else "uint32"
    block = int(data_cfg.block_size)
    n_val = max(int(n_tokens * val_fraction), block + 1)
    if n_tokens - n_val < block + 1:
        raise DataError(
            f"data: the corpus has {n_tokens} tokens, too few for data.block_size={block} "
            f"with a validation split; give more text or lower data.block_size"
        )
    with atomic_directory(where, manifest=True, replace=False) as tmp:  # meta.json and SHA256SUMS inside
        out = np.memmap(tmp / "tokens.bin", dtype=dtype, mode="w+", shape=(n_tokens,))
        pos = 0
        with Progress("packing tokens", total=n_tokens, unit="tokens") as packing:
            for batch in tokenized.iter(batch_size=1024):  # streamed from Arrow: memory stays flat
                for ids in batch["ids"]:
                    out[pos:pos + len(ids)] = ids
                    pos += len(ids)
                packing.update(sum(len(ids) for ids in batch["ids"]))
        out.flush()
        del out
        meta = dict(dtype=dtype, n_tokens=n_tokens, n_train=n_tokens - n_val, n_documents=len(lengths),
                    n_bytes=n_bytes, vocab=len(tokenizer), seconds=round(time.perf_counter() - t0, 2),
                    bad_rows_skipped=skipped)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("packed %d documents into %d tokens in %.1fs", len(lengths), n_tokens, time.perf_counter() - t0)
    return PackedCorpusInfo.read(where)


class PackedBlocks(Dataset):
    """Non-overlapping blocks of `block_size` tokens from [start, end) of a packed token file."""

    def __init__(self, info: PackedCorpusInfo, start: int, end: int, block_size: int):
        self.info, self.start, self.block_size = info, start, block_size
        self.n_blocks = max((end - start) // block_size, 0)
        self._tokens: np.memmap | None = None  # opened lazily: memmaps must not be pickled to workers

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = self.info.memmap()
        s = self.start + i * self.block_size
        return torch.from_numpy(self._tokens[s:s + self.block_size].astype(np.int64))

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded across ranks, that can start mid-epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.epoch = 0
        self.start = 0  # samples of this rank's shard to skip (set when resuming)
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.per_rank * self.world_size - self.n]  # pad so every rank gets as many
        shard = order[self.rank::self.world_size]
        start, self.start = self.start, 0
        return iter(shard[start:])

    def __len__(self) -> int:
        return self.per_rank


class ResumableLoader:
    """A DataLoader whose position Lightning stores in checkpoints (the `_Stateful` protocol).

    torch's DataLoader keeps no position; torchdata's StatefulDataLoader would, but costs a
    dependency for what is two integers here because our sampler can seek.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, num_workers: int = 0,
                 drop_last: bool = True):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        # its own generator: creating the iterator then draws no number from torch's global RNG
        # (dropout, masking), whose stream must continue exactly after a resume
        self._loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                  drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                                  persistent_workers=False, generator=torch.Generator().manual_seed(sampler.seed))
        self._consumed = 0  # batches handed out in the current epoch
        self._skip = 0

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.sampler.start = self._skip * self.batch_size
        self._consumed, self._skip = self._skip, 0
        for batch in self._loader:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.epoch = int(state["epoch"])
        self._skip = int(state["consumed"]) % max(len(self), 1)


class PackedCorpusDataModule(pl.LightningDataModule):
    """Train/validation blocks from a packed corpus (see `pack_corpus`)."""

    def __init__(self, info: PackedCorpusInfo, block_size: int, batch_size: int, seed: int, num_workers: int = 0,
                 overfit_batches: int = 0):
        super().__init__()
        self.info, self.block_size, self.batch_size, self.seed, self.num_workers = info, block_size, batch_size, seed, num_workers
        self.train_set = PackedBlocks(info, 0, info.n_train, block_size)
        self.val_set = PackedBlocks(info, info.n_train, info.n_tokens, block_size)
        self.overfit = int(overfit_batches)
        if self.overfit:  # debug=overfit: the first N training batches, every epoch, and validated on
            self.val_set = torch.utils.data.Subset(self.train_set, range(min(self.overfit * batch_size, len(self.train_set))))
        if len(self.val_set) == 0 or len(self.train_set) == 0:
            raise DataError(f"data.block_size={block_size}: longer than the corpus' train or validation split; lower it")

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> ResumableLoader:
        rank, world = self._rank()
        sampler = ResumableSampler(len(self.train_set), self.seed, shuffle=not self.overfit, rank=rank, world_size=world)
        if len(sampler) < self.batch_size:
            raise DataError(
                f"data.batch_size={self.batch_size}: the training split has only {len(sampler)} blocks per process; "
                "lower data.batch_size or data.block_size, or give more text"
            )
        return ResumableLoader(self.train_set, sampler, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        sampler = ResumableSampler(len(self.val_set), self.seed, shuffle=False, rank=rank, world_size=world)
        return DataLoader(self.val_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
