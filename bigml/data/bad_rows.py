"""Malformed rows in input files: `data.on_bad_rows=error|skip`.

    error (default)  stop with one line naming the file and line: "data.jsonl:1042: not valid JSON"
    skip             leave the row out, count it ("bad_rows_skipped" in metrics.json) and warn
                     once per file with the first bad line

A bad row is a JSON Lines line that does not parse as a JSON object, a CSV/TSV record whose number
of fields differs from the header's, or a line whose bytes do not decode in `data.encoding`; a .txt
document (one per file) that does not decode counts as one bad row.

Why a scan of our own: `datasets` reads whole files with pyarrow / pandas, which fail on the first
bad line with a message that names neither the file nor the line (JSON), silently fill a short
CSV record with nulls, or stop at undecodable bytes. The scan is one streaming pass in C-backed
parsers (json, csv); clean files are read as they are, and only a file with bad rows under `skip`
is copied, without them, to a temporary file that `datasets` then reads.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bigml.errors import ConfigError, DataError

log = logging.getLogger("bigml")
POLICIES = ("error", "skip")
csv.field_size_limit(1 << 30)  # long documents in one cell are fine; the default 128 KiB is not


@dataclass
class BadRow:
    line: int
    problem: str


def policy_of(data_cfg) -> str:
    policy = str(data_cfg.get("on_bad_rows") or "error")
    if policy not in POLICIES:
        raise ConfigError("data.on_bad_rows", f"unknown policy {policy!r}", f"choose one of {', '.join(POLICIES)}")
    return policy


def _decoded_lines(raw: io.BufferedReader, encoding: str) -> Iterator[tuple[int, bytes, str | None]]:
    """(line number from 1, raw bytes, text or None when the bytes do not decode)."""
    for n, line in enumerate(raw, start=1):
        try:
            yield n, line, line.decode(encoding)
        except UnicodeDecodeError:
            yield n, line, None


def _scan_jsonl(path: Path, encoding: str, keep) -> Iterator[BadRow]:
    with open(path, "rb") as f:
        for n, line, text in _decoded_lines(f, encoding):
            if text is None:
                yield BadRow(n, f"not valid {encoding}")
                continue
            if not text.strip():
                keep(line)
                continue
            try:
                obj = json.loads(text.rstrip("\r\n"))
            except ValueError as e:
                detail = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                yield BadRow(n, f"not valid JSON ({detail})")
                continue
            if not isinstance(obj, dict):
                yield BadRow(n, f"a JSON {type(obj).__name__}, not an object")
                continue
            keep(line)


def _scan_csv(path: Path, encoding: str, delimiter: str, keep) -> Iterator[BadRow]:
    """Records may span lines (quoted newlines): the raw lines of each record are kept together."""
    pending: list[bytes] = []
    undecodable: list[int] = []

    def lines():
        with open(path, "rb") as f:
            for n, line, text in _decoded_lines(f, encoding):
                pending.append(line)
                if text is None:
                    undecodable.append(n)
                    text = line.decode(encoding, errors="replace")
                yield text

    reader = csv.reader(lines(), delimiter=delimiter)
    header = None
    start = 1
    for record in reader:
        end = reader.line_num
        raw, pending[:] = list(pending), []
        bad_bytes = [n for n in undecodable if start <= n <= end]
        undecodable[:] = [n for n in undecodable if n > end]
        if header is None:
            header = record
            if bad_bytes:
                raise DataError(f"{path}: the header is not valid {encoding} at line {bad_bytes[0]}; set data.encoding")
            keep(b"".join(raw))
        elif bad_bytes:
            yield BadRow(bad_bytes[0], f"not valid {encoding}")
        elif not record or (len(record) == 1 and not record[0].strip()):
            keep(b"".join(raw))  # a blank line
        elif len(record) != len(header):
            yield BadRow(start, f"{len(record)} fields where the header has {len(header)}")
        else:
            keep(b"".join(raw))
        start = end + 1


def _scan_text(path: Path, encoding: str) -> Iterator[BadRow]:
    try:  # the fast path: decode in large chunks; lines are looked at only to name the bad one
        with open(path, encoding=encoding) as fh:
            while fh.read(1 << 20):
                pass
        return
    except UnicodeDecodeError:
        pass
    with open(path, "rb") as f:
        for n, _line, text in _decoded_lines(f, encoding):
            if text is None:
                yield BadRow(n, f"not valid {encoding}")
                return  # one document per file: the whole document is the bad row


def _scan(path: Path, builder: str, encoding: str, keep) -> Iterator[BadRow]:
    suffix = path.suffix.lower()
    if builder == "json":
        if suffix == ".json":
            with open(path, "rb") as f:
                first = f.read(64).lstrip()[:1]
            if first != b"{":  # a JSON array file, not JSON Lines: datasets parses it whole
                return iter(())
        return _scan_jsonl(path, encoding, keep)
    if builder == "csv":
        return _scan_csv(path, encoding, "\t" if suffix == ".tsv" else ",", keep)
    if builder == "text":
        return _scan_text(path, encoding)
    return iter(())  # parquet: typed columns, nothing to parse line by line


def _fail(path: Path, bad: BadRow) -> DataError:
    decoding = bad.problem.startswith("not valid") and "JSON" not in bad.problem
    hint = "set data.encoding (e.g. data.encoding=latin-1)" if decoding else "fix or remove the row"
    return DataError(f"{path}: {bad.problem} at line {bad.line}; {hint}, or data.on_bad_rows=skip to leave such rows out")


@contextlib.contextmanager
def checked_files(files: list[Path], builder: str, encoding: str, policy: str) -> Iterator[tuple[list[Path], int]]:
    """Yield (the files to read, rows skipped): the files themselves when clean; under `skip`,
    temporary copies without the bad rows (removed on exit, once `datasets` has read them)."""
    with tempfile.TemporaryDirectory(prefix="bigml-rows-") as tmp:
        out, skipped = [], 0
        for i, path in enumerate(files):
            if builder == "text":
                bad = next(_scan_text(path, encoding), None)
                if bad is None:
                    out.append(path)
                elif policy == "error":
                    raise _fail(path, bad)
                else:
                    skipped += 1
                    log.warning("data: %s: %s at line %d; document skipped (data.on_bad_rows=skip)", path, bad.problem, bad.line)
                continue
            copy = Path(tmp) / f"{i:05d}{path.suffix}"
            first: BadRow | None = None
            n_bad = 0
            # under skip the good rows stream into the copy as they are scanned (memory stays flat)
            with open(copy, "wb") if policy == "skip" else contextlib.nullcontext() as kept:
                for bad in _scan(path, builder, encoding, kept.write if kept is not None else (lambda _b: None)):
                    if policy == "error":
                        raise _fail(path, bad)
                    first = first or bad
                    n_bad += 1
            if n_bad == 0:
                copy.unlink(missing_ok=True)
                out.append(path)
                continue
            out.append(copy)
            skipped += n_bad
            log.warning("data: %s: %d bad rows skipped (data.on_bad_rows=skip); first: line %d: %s",
                        path, n_bad, first.line, first.problem)
        yield out, skipped
