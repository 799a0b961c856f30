"""Convert checkpoints: a Hugging Face model to a megatron_pd run directory, and back.

    python tools/convert_checkpoint.py hf-to-megatron --hf HF_DIR --out RUN_DIR \
        [--dtype bfloat16] [--keep-layers 0,2,4] [--seq-length 4096]
    python tools/convert_checkpoint.py megatron-to-hf --load RUN_OR_CKPT --out HF_DIR \
        [--dtype float32|bfloat16] [--shard-gb 4]

hf-to-megatron streams tensor by tensor (about one layer in memory) and writes config.yaml,
the tokenizer and a model-only dist checkpoint that loads at any TP/PP (a teacher, evaluation,
or a student's checkpoint.init_from). megatron-to-hf writes config.json, sharded safetensors,
generation_config.json and the tokenizer files, loadable by transformers' AutoModelForCausalLM
and lm-eval as they are. A teacher needs no conversion: distill.teacher.load=HF_DIR works.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("hf-to-megatron", help="HF model directory -> run directory")
    to_megatron.add_argument(
        "--hf", required=True, help="HF model directory (config.json, safetensors)"
    )
    to_megatron.add_argument("--out", required=True, help="the run directory to write")
    to_megatron.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="stored dtype (default: config.json's torch_dtype)",
    )
    to_megatron.add_argument("--keep-layers", help="comma-separated HF layers to keep (pruning)")
    to_megatron.add_argument(
        "--seq-length", type=int, help="the sequence length the model will run at (sliding windows)"
    )
    to_hf = commands.add_parser("megatron-to-hf", help="run directory/checkpoint -> HF directory")
    to_hf.add_argument("--load", required=True, help="run directory, checkpoint root or iter dir")
    to_hf.add_argument("--out", required=True, help="the HF model directory to write")
    to_hf.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="exported dtype (default: the checkpoint's own, so tensors round-trip exactly)",
    )
    to_hf.add_argument("--shard-gb", type=float, default=4.0, help="largest safetensors file")
    args = parser.parse_args(argv)
    from megatron_pd.platform import quiet_known_warnings

    quiet_known_warnings()
    from megatron_pd.models import convert

    try:
        if args.command == "hf-to-megatron":
            keep = [int(x) for x in args.keep_layers.split(",")] if args.keep_layers else None
            summary = convert.import_hf(args.hf, args.out, args.dtype, keep, args.seq_length)
            print(
                f"wrote {args.out}: {summary['architecture']}, {summary['layers']} layers, "
                f"{summary['chunks']} chunks ({summary['dtype']}) in {summary['seconds']:.1f}s, "
                f"peak RSS {summary['peak_rss_mb']:,.0f} MB"
            )
        else:
            summary = convert.export_hf(
                args.load, args.out, args.dtype, int(args.shard_gb * (1 << 30))
            )
            print(
                f"wrote {args.out}: {summary['architecture']}, {len(summary['files'])} "
                f"safetensors file(s), {summary['rows']} vocabulary rows, in "
                f"{summary['seconds']:.1f}s, peak RSS {summary['peak_rss_mb']:,.0f} MB"
            )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            from megatron_pd.parallel import topology

            topology.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
