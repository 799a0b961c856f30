"""Tokenize jsonl/text files or directories into megatron .bin/.idx (BOS/EOD as the tokenizer says).

Example:
    python tools/preprocess_data.py --input data/docs.jsonl --tokenizer-model data/tok.model \
        --output-prefix data/docs_text_document --workers 8
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pd.data.corpus import expand_inputs, stdlib_corpus_files  # noqa: E402
from megatron_pd.data.preprocess import preprocess  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="text/jsonl files or directories")
    source.add_argument("--stdlib", action="store_true", help="the Python stdlib source corpus")
    parser.add_argument("--pattern", help="filename filter inside directories, e.g. '*.jsonl'")
    parser.add_argument(
        "--tokenizer-model",
        required=True,
        help="SentencePiece .model, HF tokenizer.json or an HF model/tokenizer directory",
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default="text", help="document field of jsonl inputs")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--shuffle-seed",
        type=int,
        default=1234,
        help="write the input files in this seeded random order (default 1234): the "
        "valid/test splits (the last documents) then come from all over the corpus",
    )
    order.add_argument(
        "--keep-order",
        action="store_true",
        help="write files in input order (valid/test: the last files, e.g. by name)",
    )
    args = parser.parse_args(argv)
    try:
        files = stdlib_corpus_files() if args.stdlib else expand_inputs(args.input, args.pattern)
        stats = preprocess(
            files,
            args.output_prefix,
            args.tokenizer_model,
            json_key=args.json_key,
            workers=args.workers,
            progress=not args.quiet,
            shuffle_seed=None if args.keep_order else args.shuffle_seed,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output_prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens "
        f"({stats.skipped} empty skipped) in {stats.seconds:.1f}s "
        f"({stats.tokens / max(stats.seconds, 1e-9):,.0f} tokens/s)"
    )
    if stats.binary_skipped:
        shown = ", ".join(stats.binary_skipped[:3])
        more = f" and {len(stats.binary_skipped) - 3} more" if len(stats.binary_skipped) > 3 else ""
        print(f"skipped {len(stats.binary_skipped)} binary file(s): {shown}{more}")
    if args.keep_order:
        print("documents in input order: the valid/test splits are the last of them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
