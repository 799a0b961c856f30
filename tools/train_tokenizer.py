"""Train a tokenizer on text files, directories or jsonl: SentencePiece, or an HF tokenizer.json.

Example:
    python tools/train_tokenizer.py --input data/docs.jsonl --output-prefix data/tok \
        --vocab-size 32000                       # data/tok.model (SentencePiece BPE)
    python tools/train_tokenizer.py --stdlib --output-prefix data/stdlib_tok --vocab-size 4096 \
        --model-type hf-bpe                      # data/stdlib_tok/ (HF byte-level BPE)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pd.data.corpus import expand_inputs, stdlib_corpus_files  # noqa: E402
from megatron_pd.data.tokenizer import (  # noqa: E402
    load_tokenizer,
    train_hf_bpe,
    train_sentencepiece,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="text/jsonl files or directories")
    source.add_argument("--stdlib", action="store_true", help="the Python stdlib source corpus")
    parser.add_argument("--pattern", help="filename filter inside directories, e.g. '*.jsonl'")
    parser.add_argument(
        "--output-prefix",
        required=True,
        help="writes PREFIX.model/.vocab (SentencePiece) or the directory PREFIX/ (hf-bpe)",
    )
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument(
        "--model-type",
        choices=("bpe", "unigram", "hf-bpe"),
        default="bpe",
        help="SentencePiece bpe/unigram, or hf-bpe: a byte-level BPE tokenizer.json",
    )
    parser.add_argument("--json-key", default="text", help="document field of jsonl inputs")
    parser.add_argument("--max-sentences", type=int, default=2_000_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    try:
        files = stdlib_corpus_files() if args.stdlib else expand_inputs(args.input, args.pattern)
        start = time.monotonic()
        if args.model_type == "hf-bpe":
            path = train_hf_bpe(files, args.output_prefix, args.vocab_size, args.json_key)
        else:
            path = train_sentencepiece(
                files,
                args.output_prefix,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                json_key=args.json_key,
                max_sentences=args.max_sentences,
                num_threads=args.threads,
            )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tok = load_tokenizer(path)
    print(
        f"wrote {path}: {args.model_type} vocab {tok.vocab_size} from {len(files)} file(s) "
        f"in {time.monotonic() - start:.1f}s (fingerprint {tok.fingerprint})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
