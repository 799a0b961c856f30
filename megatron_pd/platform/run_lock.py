"""One run, one owner: an exclusive lock on a directory a job writes (a run or a store).

``DirectoryLock(path).acquire()`` takes an ``flock`` on ``<path>/.megatron_pd.lock`` and writes
who holds it (host, pid, start time, command line) into the file. A second job on the same
directory gets a ValueError naming that holder. The kernel drops the lock when the holder's
process dies - however it dies - so a stale lock of a dead job is simply taken over. flock
works within one host and on most parallel file systems (Lustre, GPFS; NFS v4 with its lock
manager); where a file system does not support it the lock is skipped with a notice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time

LOCK_NAME = ".megatron_pd.lock"


class DirectoryLock:
    def __init__(self, path: str, what: str = "run directory"):
        self.path, self.what = path, what
        self.file = None

    def acquire(self) -> bool:
        """Take the lock (ValueError if another live job holds it); False where the file
        system cannot lock."""
        os.makedirs(self.path, exist_ok=True)
        lock_path = os.path.join(self.path, LOCK_NAME)
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            try:
                info = json.loads(holder)
                holder = (
                    f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
                )
            except (ValueError, KeyError):
                pass
            raise ValueError(
                f"{self.what} {self.path} is in use by another job: {holder}. Wait for it, "
                "stop it, or use another directory"
            ) from None
        except OSError as err:  # a file system without flock
            handle.close()
            print(f"note: cannot lock {self.path} ({err}); going on unlocked", file=sys.stderr)
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(sys.argv)[:300],
                }
            )
        )
        handle.flush()
        self.file = handle  # held open (and locked) until release or process exit
        return True

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None


@contextlib.contextmanager
def job_lock(path: str, rank: int, what: str = "run directory"):
    """``with job_lock(...)``: rank 0 holds the lock on ``path`` for the block; every rank
    raises the same ValueError if another job holds it (collective: one MAX all-reduce over
    the world)."""
    import torch.distributed as dist

    from megatron_pd.parallel.collectives import any_rank

    lock, message = None, ""
    if rank == 0:
        lock = DirectoryLock(path, what)
        try:
            lock.acquire()
        except ValueError as err:
            lock, message = None, str(err)
    if any_rank(bool(message), dist.group.WORLD):
        raise ValueError(message or f"{what} {path} is in use by another job")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
