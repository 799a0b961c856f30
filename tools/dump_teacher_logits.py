"""Dump a frozen teacher's top-p-k logits over the training data into an offline store.

    torchrun --nproc_per_node=2 tools/dump_teacher_logits.py \\
        --config examples/configs/quickstart_pd.yaml --store runs/store \\
        --distill.teacher.load=runs/quickstart/teacher --distill.truncation=top-0.95-100 \\
        --data.tokenizer_model=... --data.blend=[...]

The config is the student's training config: the dump builds the datasets exactly as that run
will (so the store's dataset fingerprint matches) and uses ``distill.teacher`` (its own TP/PP;
its data-parallel replicas share the work) and ``distill.truncation``. It dumps exactly the
samples that run reads (``--coverage split``: every sample of each split). Rerunning the same
command after an interruption continues the dump; the finished store is byte-identical. Run
it again with more ``--train.train_steps`` to extend the store: only the missing samples are
dumped, the existing shards stay as they are. Train from it with ``--distill.store=runs/store``
(and no distill.teacher.load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_pd.config.loader import load_config
    from megatron_pd.platform import quiet_known_warnings
    from megatron_pd.platform.lifetime import (
        contain_helpers,
        die_with_parent,
        launched_by_torchrun,
    )

    quiet_known_warnings()
    if launched_by_torchrun():  # a rank stops when its launcher dies (its shards are atomic)
        die_with_parent()
        contain_helpers()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="the student's YAML training config")
    parser.add_argument("--store", required=True, help="output store directory")
    parser.add_argument("--splits", nargs="+", default=["train", "valid"])
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--batch-size", type=int, help="teacher batch (default: micro batch)")
    parser.add_argument("--value-bits", type=int, default=8, choices=(6, 7, 8))
    parser.add_argument(
        "--coverage",
        choices=("run", "split"),
        default="run",
        help="run: the samples the config's run reads (default); split: every sample",
    )
    args, overrides = parser.parse_known_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, overrides)
        cfg.distill.store = None  # the dump reads the teacher, never a store
        from megatron_pd.logits.dump import dump_teacher_logits
        from megatron_pd.parallel import topology
        from megatron_pd.train import _absolute_paths, check_teacher_length

        _absolute_paths(cfg)
        check_teacher_length(cfg, rank == 0)
        topology.init_distributed()
        start = time.monotonic()
        summary = dump_teacher_logits(
            cfg,
            os.path.abspath(args.store),
            args.splits,
            args.samples_per_shard,
            args.batch_size,
            args.value_bits,
            coverage=args.coverage,
        )
    except ValueError as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            from megatron_pd.parallel import topology

            topology.destroy()
    if rank == 0:
        print(f"dump finished in {time.monotonic() - start:.1f}s")
        for split, stats in summary.items():
            print(
                f"{split}: "
                + json.dumps(
                    {k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()}
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
