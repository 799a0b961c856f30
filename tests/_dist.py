"""Run a function on N gloo ranks in forked processes (the multi-rank test harness).

The parent (pytest) has imported torch and megatron-core once; each call forks ``world_size``
children, which start gloo on a fresh port, activate the megatron CPU adaptation, run
``fn(rank, world_size, *args)`` and send back its (picklable) return value or traceback.
Forking skips the ~5 s import per rank that spawning would pay. Children never return into
pytest: they leave with ``os._exit``.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import socket
import time
import traceback
from multiprocessing.connection import wait

# Import megatron-core in the parent so children inherit it (the expensive part).
import megatron.core  # noqa: F401
import megatron.core.models.gpt  # noqa: F401
import megatron.core.optimizer  # noqa: F401
import megatron.core.pipeline_parallel  # noqa: F401
import torch

DEFAULT_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank, world_size, port, fn, args, kwargs, conn):
    code = 0
    try:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        torch.set_num_threads(1)
        from megatron_pd.parallel import topology
        from megatron_pd.platform import quiet_known_warnings

        quiet_known_warnings()
        torch.distributed.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S),
        )
        topology.init_distributed()  # keeps the group above; activates the CPU adaptation
        result = fn(rank, world_size, *args, **kwargs)
        # Plain pickle copies tensor data; multiprocessing's pickler would pass shared-memory
        # handles that die with this process.
        conn.send_bytes(pickle.dumps(("ok", result)))
        topology.destroy()
    except BaseException:  # report everything, including assertion failures
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        code = 1
    finally:
        conn.close()
        # Run multiprocessing's exit hooks (they stop helper processes such as the results
        # queue manager dist_checkpointing starts), but none of pytest's.
        import multiprocessing.util

        multiprocessing.util._exit_function()
        os._exit(code)


def run_distributed(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs):
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    Returns the list of per-rank results. Raises AssertionError with the failing ranks'
    tracebacks if any rank raised, and kills every rank if one does not finish in time.
    """
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    pipes, procs = [], []
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child, args=(rank, world_size, port, fn, args, kwargs, child_end)
        )
        proc.start()
        child_end.close()
        pipes.append(parent_end)
        procs.append(proc)
    results, errors = [None] * world_size, []
    pending = dict(enumerate(pipes))
    deadline = time.monotonic() + timeout
    try:
        while pending:
            # Once a rank failed, its peers are likely stuck in a collective: short grace.
            remaining = deadline - time.monotonic()
            if errors:
                remaining = min(remaining, 5.0)
            ready = wait(list(pending.values()), timeout=max(remaining, 0))
            if not ready:
                errors.extend(f"rank {r}: no result in time (killed)" for r in pending)
                break
            for rank in [r for r, p in pending.items() if p in ready]:
                pipe = pending.pop(rank)
                try:
                    status, payload = pickle.loads(pipe.recv_bytes())
                except EOFError:
                    errors.append(f"rank {rank}: died without a result")
                    continue
                if status == "ok":
                    results[rank] = payload
                else:
                    errors.append(f"rank {rank}:\n{payload}")
    finally:
        for proc in procs:
            proc.join(timeout=5 if not errors else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise AssertionError("distributed run failed:\n" + "\n".join(errors))
    return results
