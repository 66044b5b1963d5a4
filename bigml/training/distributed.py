"""When a process of a multi-process (DDP) run dies: the others stop too, soon, with one line.

    rank > 0 loses its parent (rank 0 under Lightning's launcher, the torchrun agent, slurmstepd):
        the kernel kills it at once (PR_SET_PDEATHSIG); without it the child sat for the whole
        process-group timeout in the rendezvous or a collective
    a peer dies mid-training: gloo/NCCL fail the next collective within seconds ("Connection
        closed by peer"); bigml reports it as one line (PeerLost, exit 1), not a traceback
    a peer hangs, or dies before the rendezvous completes: the process-group timeout
        (trainer.ddp_timeout_s, conf/trainer/ddp.yaml) ends the wait

Checkpoints are saved by rank 0 atomically, so `resume=auto` continues from the last one.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import signal
import sys
from datetime import timedelta

from bigml.errors import BigmlError

log = logging.getLogger("bigml")
_PEER_ERRORS = re.compile(r"Connection (closed|reset) by peer|Broken pipe|ProcessGroupNCCL|NCCL error|"
                          r"Timed out|timed out|DistStoreError|Socket Timeout|recvValue|gloo", re.I)


class PeerLost(BigmlError):
    """Another process of a multi-process run died or stopped answering (exit 1)."""

    @classmethod
    def from_error(cls, e: BaseException) -> PeerLost | None:
        if not isinstance(e, RuntimeError) or not _in_distributed_run():
            return None
        text = str(e)
        if not _PEER_ERRORS.search(text):
            return None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0][:160]  # gloo's prefix and advice
        return cls(f"another process of this multi-process run died or stopped answering ({first}); "
                   f"this one stopped too; resume=auto continues from the last checkpoint")


def _in_distributed_run() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "MASTER_ADDR" in os.environ


def die_with_parent() -> None:
    """In a rank > 0 process: be killed when the process that started it dies (Linux)."""
    if os.environ.get("LOCAL_RANK", "0") in ("", "0") or platform.system() != "Linux":
        return
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call: nobody is left to kill us
        os.kill(os.getpid(), signal.SIGKILL)


def finish_process_group() -> None:
    """After a command succeeds under DDP: wait for every process, then take the process group down.

    Without this each process tears gloo down in its own interpreter exit; rank 1 (which writes
    nothing) exits first and a peer still closing its sockets can abort (SIGABRT from gloo's
    I/O thread, seen once in CI under torchrun). PyTorch asks programs to call
    destroy_process_group() before they exit; Lightning leaves the group up on purpose."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch has no group
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    except RuntimeError as e:  # a peer died after this process's share of the work was done
        log.warning("another process of this run did not finish cleanly (%s)", str(e).splitlines()[0][:160])
    finally:
        dist.destroy_process_group()


def ddp_strategy(timeout_s: float | None):
    """Lightning's DDPStrategy with a process-group timeout (Lightning's default is 30 minutes)."""
    from pytorch_lightning.strategies import DDPStrategy

    return DDPStrategy(timeout=timedelta(seconds=float(timeout_s))) if timeout_s else DDPStrategy()
