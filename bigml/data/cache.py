"""The cache of trained tokenizers and tokenized corpora (BIGML_CACHE_DIR): one entry per key,
built by one process at a time, published atomically, checked before use.

    with build_lock(where):                      # two runs that need the same entry: one builds it,
        value = open_cached(where, load, what)   # the other waits and then reads it
        if value is None:
            with atomic_directory(where, manifest=True, replace=False) as tmp: ...

An entry that fails its checksums (SHA256SUMS) or cannot be read is removed with a warning and
rebuilt; it is a cache, so nothing is lost but time. The lock is an OS file lock (filelock: flock
on POSIX), released by the kernel when its holder dies, so a killed build never blocks the next.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from bigml.atomic import CorruptFile, remove_stale_temporaries, verify_directory
from bigml.errors import BigmlError

log = logging.getLogger("bigml")
T = TypeVar("T")


@contextlib.contextmanager
def build_lock(where: Path) -> Iterator[None]:
    where.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(where.with_name(where.name + ".lock")))
    try:
        lock.acquire(timeout=2)
    except Timeout:
        log.info("waiting for another process that is building %s", where)
        lock.acquire()
    try:
        remove_stale_temporaries(where.parent, where.name)  # left by a build that was killed
        yield
    finally:
        lock.release()


def open_cached(where: Path, load: Callable[[Path], T], what: str) -> T | None:
    """`load(where)` if the entry exists and is intact; None if absent or damaged (then removed)."""
    if not where.exists():
        return None
    try:
        verify_directory(where)
        return load(where)
    except CorruptFile as e:
        reason = str(e)
    except (KeyboardInterrupt, SystemExit, BigmlError):  # interrupted or preempted, not damaged
        raise
    except BaseException as e:  # noqa: BLE001 - any damage means: build it again (the Rust
        # tokenizers library reports a malformed file with a PanicException, a BaseException)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    log.warning("the cached %s in %s is damaged (%s); rebuilding it", what, where, reason)
    shutil.rmtree(where, ignore_errors=True)
    return None
