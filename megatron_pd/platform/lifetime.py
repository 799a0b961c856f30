"""Nothing of a run outlives it: a process dies with the process that started it.

``die_with_parent()`` asks the Linux kernel (prctl PR_SET_PDEATHSIG) to send this process
SIGTERM when its parent dies - however it dies, kill -9 included. Training ranks call it at
start, so the ranks of a torchrun job whose launcher was killed stop (SIGTERM is the trainer's
pre-emption signal: every rank agrees on it at the next step boundary, saves and exits)
instead of training on unseen beside a restarted job; the explorer sets it on the jobs it
starts (``preexec_fn=die_with_parent``). A no-op where prctl is unavailable.
"""

from __future__ import annotations

import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Get ``sig`` when the parent process exits; False where the platform cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # the parent may already be gone (we were re-parented before the call): act now
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)
    return True


def launched_by_torchrun() -> bool:
    """Whether this process is a rank that torchrun's agent started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ
