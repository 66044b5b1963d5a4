"""Writes that either happen completely or not at all, and a way to tell later that they are intact.

A run killed mid-write (SIGKILL, out-of-memory, a pre-empted node) must never leave a truncated
checkpoint, metrics.json or model/ directory that looks valid. Everything is written to a temporary
name in the same directory and then renamed, which POSIX makes atomic within one filesystem.

Renaming protects against half-written files; checksums protect against files damaged afterwards
(a bad disk, a partial copy, bytes overwritten), which loaders would otherwise use silently:
torch.load does not check the CRCs in its zip files and safetensors reads any bytes as weights.

    <file>.sha256        beside a single file (checkpoints): `sha256sum -c` format
    <dir>/SHA256SUMS     inside a directory (model/, cached tokenizers and corpora), written into
                         the temporary directory before the rename, so it always matches
    verify_file / verify_directory   raise CorruptFile naming the first damaged file; a file or
                         directory without checksums (older bigml, other tools) is not checked

Fault injection (tests and scripts/faults.py): BIGML_FAULT="<action>:<name>[:<n>]" makes the n-th
(default 1st) atomic write whose file name contains <name>, or whose directory is named <name>
(`model`, `corpora`, `tokenizers`), fail half-way:
`enospc` (no space left), `erofs` (read-only filesystem), `kill` (SIGKILL, as a crash would).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bigml.errors import DataError

CHECKSUM_SUFFIX = ".sha256"
MANIFEST = "SHA256SUMS"
# Not in the manifest: the model card (README.md) is documentation that bigml rewrites once the run's
# metrics are known, after the weights were sealed; a changed card never changes what loads.
UNSEALED = ("README.md",)


class CorruptFile(DataError):
    """A file bigml wrote no longer matches its checksum, or cannot be parsed."""

    def __init__(self, path: str | os.PathLike, reason: str, hint: str = ""):
        self.path = Path(path)
        super().__init__(f"{path}: {reason}{'; ' + hint if hint else ''}")


# -- fault injection ------------------------------------------------------------------------------
_fault_counts: dict[str, int] = {}


def _inject_fault(path: Path) -> None:
    """Called half-way through every atomic write (see the module docstring)."""
    spec = os.environ.get("BIGML_FAULT")
    if not spec:
        return
    action, _, rest = spec.partition(":")
    needle, _, nth = rest.partition(":")
    if needle not in path.name and needle != path.parent.name:  # a file's name, or its directory's
        return
    _fault_counts[spec] = _fault_counts.get(spec, 0) + 1
    if _fault_counts[spec] != int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = {"enospc": errno.ENOSPC, "erofs": errno.EROFS}.get(action)
    if code is not None:
        raise OSError(code, os.strerror(code), str(path))


# -- checksums ------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _read_sums(path: Path) -> list[tuple[str, str]]:
    """(hex digest, name) lines of a sha256sum-format file."""
    out = []
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if digest and name:
            out.append((digest.strip(), name.strip()))
    return out


def checksum_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def verify_file(path: str | os.PathLike) -> bool:
    """True if `path` matches its `.sha256` file, False if it has none; CorruptFile if it differs."""
    path = Path(path)
    sums = checksum_path(path)
    if not sums.exists():
        return False
    try:
        expected = {d for d, _ in _read_sums(sums)}
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptFile(sums, f"unreadable checksum file ({e})") from None
    if not path.exists():
        raise CorruptFile(path, "missing (its checksum file exists)")
    if sha256_file(path) not in expected:
        raise CorruptFile(path, "does not match its checksum (damaged after it was written)")
    return True


def verify_directory(directory: str | os.PathLike) -> bool:
    """True if every file in `directory`/SHA256SUMS is present and matches, False without SHA256SUMS;
    CorruptFile naming the first file that is missing or differs."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.exists():
        return False
    try:
        entries = _read_sums(manifest)
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptFile(manifest, f"unreadable ({e})") from None
    for digest, name in entries:
        if name in UNSEALED:  # manifests written before the card was left out
            continue
        f = directory / name
        if not f.is_file():
            raise CorruptFile(f, f"missing (listed in {MANIFEST})")
        if sha256_file(f) != digest:
            raise CorruptFile(f, f"does not match {MANIFEST} (damaged or changed after bigml wrote it)")
    return True


def write_manifest(directory: Path) -> None:
    lines = []
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
                    and p.relative_to(directory).as_posix() not in UNSEALED):
        lines.append(f"{sha256_file(f)}  {f.relative_to(directory).as_posix()}")
    (directory / MANIFEST).write_text("\n".join(lines) + "\n")


# -- atomic writes --------------------------------------------------------------------------------
def _write_file_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            _inject_fault(path)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, checksum: bool = False) -> None:
    """Write `data` to `path` atomically; with `checksum`, keep `path`.sha256 in step with it.

    The checksum file lists the new digest (and the current file's) before the rename, and only the
    new one after it, so whatever instant a crash comes, the file on disk matches a listed digest.
    """
    path = Path(path)
    if not checksum:
        _write_file_atomically(path, data)
        return
    sums = checksum_path(path)
    new = hashlib.sha256(data).hexdigest()
    old = []
    if sums.exists() and path.exists():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            old = [d for d, _ in _read_sums(sums)]
    _write_file_atomically(sums, "".join(f"{d}  {path.name}\n" for d in dict.fromkeys([new, *old])).encode())
    _write_file_atomically(path, data)
    _write_file_atomically(sums, f"{new}  {path.name}\n".encode())


class _HashingWriter:
    """A binary file that hashes what passes through it (the checksum without reading the file back)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def atomic_write_stream(path: str | os.PathLike, write: Callable[[Any], None], checksum: bool = False) -> None:
    """`write(f)` into a temporary file beside `path`, then rename: as `atomic_write_bytes`, without
    holding the whole content in memory first (a checkpoint with optimizer state is three times the
    weights; serialized into a buffer, then copied out of it, it doubled the peak memory of a save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            hashing = _HashingWriter(f)
            write(hashing)
            _inject_fault(path)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if checksum:  # the same protocol as atomic_write_bytes: both digests listed across the rename
            sums, new = checksum_path(path), hashing.sha.hexdigest()
            old = []
            if sums.exists() and path.exists():
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    old = [d for d, _ in _read_sums(sums)]
            _write_file_atomically(sums, "".join(f"{d}  {path.name}\n" for d in dict.fromkeys([new, *old])).encode())
        os.replace(tmp, path)
        if checksum:
            _write_file_atomically(sums, f"{new}  {path.name}\n".encode())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_with_checksum(path: str | os.PathLike) -> None:
    for p in (Path(path), checksum_path(path)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def remove_stale_temporaries(directory: str | os.PathLike, name: str = "*") -> None:
    """Delete the temporary files and directories a killed writer left (`.<name>.*.tmp`, `.<name>.old`).
    Only where no other process can be writing: a run directory being resumed, a cache under its lock."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in [*directory.glob(f".{name}.*.tmp"), *directory.glob(f".{name}.old")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, manifest: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it becomes `path` in one rename.

    `manifest`: write SHA256SUMS of its files first (verify_directory checks them later).
    `replace=False` publishes once: if `path` appeared meanwhile (another process built the same
    cache), that copy is kept and this one discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        _inject_fault(path)
        # mkdtemp (and some writers, e.g. safetensors) create owner-only files; use the usual modes
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
        if path.exists() and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
        elif path.exists():
            # Renaming over a non-empty directory is not atomic; move the old one aside first so
            # that at every instant one complete version exists under some name.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, path)
            except OSError as e:  # another process published `path` between the check and the rename
                if replace or e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_intact(path: str | Path, key: str = "model.path") -> None:
    """DataError naming the file if a model directory bigml wrote (SHA256SUMS) was damaged since;
    directories from elsewhere carry no checksums and are not checked. Checked once per process."""
    p = Path(str(path)).expanduser()
    manifest = p / MANIFEST
    if manifest.is_file():
        _check_intact(str(p.resolve()), manifest.stat().st_mtime_ns, key)


@functools.lru_cache(maxsize=32)
def _check_intact(path: str, _manifest_mtime: int, key: str) -> None:
    try:
        verify_directory(path)
    except CorruptFile as e:
        raise DataError(f"{key}: {e}; the model directory is damaged: use another copy (or the run's "
                        f"checkpoints/ with resume=), or if you edited it on purpose, delete its {MANIFEST}") from None
