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


def _helper_child() -> None:
    """In a helper process of a rank: leave the job's process group (torchrun sends SIGTERM to
    a rank's whole group; a checkpoint writer must not die in the middle of the pre-emption
    save that signal asks for) and die with the rank, however the rank dies."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    die_with_parent(signal.SIGKILL)


_CONTAINED = False
_MANAGERS: list = []  # the helper managers started here, alive as long as this process


def contain_helpers() -> None:
    """Make every helper process a rank starts from now on die with it.

    Forked helpers (megatron's checkpoint writers, a non-persistent async save) through an
    at-fork hook. megatron-core's dist_checkpointing also *spawns* a multiprocessing manager
    for its write-results queue once per process (measured: ~280 MB, and it held the job's
    stdout open after a SIGKILL, for as long as anyone cared to wait); it is started here
    instead, with the same hook as its initializer, and handed to megatron-core where its
    (private, 0.16-0.19) queue slot exists - elsewhere this part does nothing.
    """
    global _CONTAINED
    if _CONTAINED:
        return
    _CONTAINED = True
    os.register_at_fork(after_in_child=_helper_child)
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return  # another megatron-core, or a queue already made
    import multiprocessing
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_helper_child)
    _MANAGERS.append(manager)
    filesystem_async._results_queue = manager.Queue()
