"""torchrun, ending in one line when the job is interrupted: the command line is torchrun's.

    python -m megatron_pd.launch --nproc_per_node=8 -m megatron_pd.train --config CFG ...

On SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption) torchrun's agent forwards the
signal to the ranks - which save a checkpoint at the next step boundary and exit - waits for
them and then re-raises it as a traceback; here that ending is one line and the exit status
128 + the signal's number. SIGUSR1 (SLURM's ``--signal=USR1@...`` warning) would end torchrun
itself at once (it installs no handler) and with it, through PDEATHSIG, the ranks before they
saved; here it is forwarded to the ranks like SIGTERM and ends the same way. Everything else
(arguments, rendezvous, restarts, failures) is torchrun's own. launch/torchrun.sh and
launch/slurm/node_entry.sh start jobs with it.
"""

from __future__ import annotations

import os
import signal
import sys


def _children(pid: int) -> list:
    """The processes whose parent is ``pid`` (from /proc; empty where there is none)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _interrupted(sig: int) -> int:
    print(
        f"megatron_pd.launch: {signal.Signals(sig).name}: the ranks were asked to save a "
        "checkpoint and exit",
        file=sys.stderr,
        flush=True,
    )
    return 128 + int(sig)


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    received = []

    def forward(signum, frame):
        received.append(signum)
        for child in _children(os.getpid()):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGUSR1, forward)
    try:
        torchrun_main()
    except SignalException as err:
        return _interrupted(err.sigval)
    if received:
        return _interrupted(received[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
