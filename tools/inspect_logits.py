"""Print a logits store's header, statistics and a few decoded tokens.

    python tools/inspect_logits.py runs/store                  # every split
    python tools/inspect_logits.py runs/store/train --samples 2 --tokens 3 \\
        --tokenizer-model data/tok.model                       # show pieces, not ids
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def inspect_split(split_dir: str, samples: int, tokens: int, entries: int, tokenizer) -> None:
    import numpy as np

    from megatron_pd.logits.store import StoreReader

    reader = StoreReader(split_dir, require_complete=False)
    header = reader.header
    print(f"== {split_dir}")
    print(
        f"complete: {header.complete}   source: {header.source}   samples: "
        f"{reader.num_samples} in {header.num_shards or 'unknown'} shards"
    )
    print(f"vocab {header.vocab_size}, tokenizer {header.tokenizer_fingerprint}")
    print("dataset: " + json.dumps(header.dataset))
    print("teacher: " + json.dumps({k: v for k, v in header.teacher.items() if k != "model"}))
    print("truncation: " + json.dumps(header.truncation))
    print("encoding: " + json.dumps(header.encoding))
    if header.stats:
        print(
            "stats: "
            + json.dumps(
                {k: round(v, 6) if isinstance(v, float) else v for k, v in header.stats.items()}
            )
        )
    ids = reader.sample_ids()[:samples]
    for sample in ids:
        kept, logp, log_tail = reader.get(sample)
        step = reader.step_of(sample)
        print(f"-- sample {sample}" + (f" (recorded at training step {step})" if step >= 0 else ""))
        for t in range(min(tokens, kept.shape[0])):
            valid = kept[t] >= 0
            order = np.argsort(-logp[t][valid])[:entries]
            pairs = []
            for i in order:
                token = int(kept[t][valid][i])
                name = repr(tokenizer.piece(token)) if tokenizer else str(token)
                pairs.append(f"{name}:{np.exp(logp[t][valid][i]):.3f}")
            mass = float(np.exp(logp[t][valid]).sum())
            tail = "" if log_tail is None else f", tail {np.exp(np.float64(log_tail[t])):.3g}"
            print(
                f"   token {t}: {int(valid.sum())} kept, mass {mass:.3f}{tail} | " + " ".join(pairs)
            )
    reader.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store", help="a store directory or one of its splits")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--entries", type=int, default=5, help="most probable entries shown")
    parser.add_argument("--tokenizer-model", help="show token pieces instead of ids")
    args = parser.parse_args(argv)
    tokenizer = None
    if args.tokenizer_model:
        from megatron_pd.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(args.tokenizer_model)
    if os.path.isfile(os.path.join(args.store, "header.json")):
        splits = [args.store]
    else:
        splits = [
            os.path.join(args.store, d)
            for d in sorted(os.listdir(args.store))
            if os.path.isfile(os.path.join(args.store, d, "header.json"))
        ]
    if not splits:
        print(f"error: {args.store} holds no logits store", file=sys.stderr)
        return 2
    try:
        for split in splits:
            inspect_split(split, args.samples, args.tokens, args.entries, tokenizer)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
