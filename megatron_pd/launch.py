"""torchrun, ending in one line when the job is interrupted: the command line is torchrun's.

    python -m megatron_pd.launch --nproc_per_node=8 -m megatron_pd.train --config CFG ...

On SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption) torchrun's agent forwards the
signal to the ranks - which save a checkpoint at the next step boundary and exit - waits for
them and then re-raises it as a traceback; here that ending is one line and the exit status
128 + the signal's number. Everything else (arguments, rendezvous, restarts, failures) is
torchrun's own. launch/torchrun.sh and launch/slurm/node_entry.sh start jobs with it.
"""

from __future__ import annotations

import signal
import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main()
    except SignalException as err:
        name = signal.Signals(err.sigval).name
        print(
            f"megatron_pd.launch: {name}: the ranks were asked to save a checkpoint and exit",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
