"""Errors a user can fix, and the exit codes bigml promises to scripts.

Exit codes (documented in README.md, relied on by CI pipelines):
  0  success
  1  runtime failure (a bug, an out-of-memory, a diverged run, a failed metric gate...)
  2  usage, config or data error: something in the command line, a config or an input file is wrong
  143 preempted: SIGTERM or SIGUSR1 stopped a run after saving a checkpoint; resume=auto continues it

Anything raised as a `UsageError` is printed as one line (what is wrong, where, what to do) with no
traceback unless BIGML_DEBUG=1 or HYDRA_FULL_ERROR=1 is set.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a job killed by SIGTERM


class BigmlError(Exception):
    """Base of the errors bigml reports as one line."""

    exit_code = EXIT_FAILURE


class UsageError(BigmlError):
    """A bad command line, config value or input file: exit code 2."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A config key has a value bigml cannot use."""

    def __init__(self, key: str, problem: str, hint: str | None = None):
        self.key = key
        msg = f"{key}: {problem}"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


class DataError(UsageError):
    """An input file or dataset is missing, empty or malformed."""


class TrainingDiverged(BigmlError):
    """The loss became NaN or infinite: exit code 1 (a runtime failure, not a usage error)."""

    status = "diverged"  # metrics.json


class Preempted(BigmlError):
    """A preemption signal (SIGTERM, SIGUSR1) ended the command; the run can be resumed."""

    exit_code = EXIT_PREEMPTED
    status = "preempted"


class StorageError(BigmlError):
    """Writing failed: the disk is full, the filesystem read-only, a directory not writable (exit 1).
    The run keeps what it had saved: checkpoints are written atomically, so the previous one is intact."""

    ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG)

    @classmethod
    def from_os_error(cls, e: BaseException) -> StorageError | None:
        if not isinstance(e, OSError) or e.errno not in cls.ERRNOS:
            return None
        what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the filesystem is read-only", errno.EFBIG: "the file is too large for the filesystem"}
        reason = what.get(e.errno, e.strerror or "not writable")
        where = f" {e.filename}" if e.filename else ""
        return cls(f"cannot write{where}: {reason}; free space or point BIGML_OUTPUT_ROOT / BIGML_CACHE_DIR "
                   f"elsewhere, then resume=auto continues from the last checkpoint")


class GateFailed(BigmlError):
    """A metric gate (eval.fail_below / fail_above) was not met: exit code 1, not a usage error."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
