"""Write two local lm-evaluation-harness tasks over held-out Python stdlib files (no hub).

    python examples/lm_eval_tasks/make_stdlib_tasks.py --out runs/lm_eval_tasks [--files 200]

* ``stdlib_next_line`` (multiple choice, acc / acc_norm): the first lines of a held-out file
  and four candidate next lines - the true one and three lines of other files.
* ``stdlib_perplexity`` (loglikelihood_rolling: word/byte perplexity, bits per byte): whole
  held-out files.

The held-out files are the last 1.5% of the corpus in sorted order: the quickstart's 98/2
document split (megatron splits documents in order) keeps them out of training. Each task is a YAML next to its jsonl data (absolute
paths, so ``--include_path OUT`` works from any directory).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_pd.data.corpus import stdlib_corpus_files  # noqa: E402

NEXT_LINE = """task: stdlib_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
PERPLEXITY = """task: stdlib_perplexity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--held-out", type=float, default=0.015, help="fraction of the corpus to draw from"
    )
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    corpus = stdlib_corpus_files()
    files = corpus[int(len(corpus) * (1.0 - args.held_out)) :]
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if len(text) > 400:
            texts.append(text)
    lines_of = [[ln for ln in t.splitlines() if ln.strip()] for t in texts]
    os.makedirs(args.out, exist_ok=True)
    questions = []
    while len(questions) < args.questions:
        i = rng.randrange(len(texts))
        lines = lines_of[i]
        if len(lines) < 12:
            continue
        cut = rng.randrange(6, len(lines) - 1)
        answer = lines[cut]
        others = [rng.choice(lines_of[j]) for j in rng.sample(range(len(texts)), 4) if j != i][:3]
        if len(others) < 3 or answer in others:
            continue
        choices = others + [answer]
        rng.shuffle(choices)
        questions.append(
            {
                "context": "\n".join(lines[max(0, cut - 6) : cut]) + "\n",
                "choices": choices,
                "label": choices.index(answer),
            }
        )
    data = {}
    for name, rows in (
        ("next_line", questions),
        ("perplexity", [{"text": t[:4000]} for t in texts[:50]]),
    ):
        path = os.path.abspath(os.path.join(args.out, f"stdlib_{name}.jsonl"))
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        data[name] = path
    with open(os.path.join(args.out, "stdlib_next_line.yaml"), "w") as f:
        f.write(NEXT_LINE.format(data=data["next_line"]))
    with open(os.path.join(args.out, "stdlib_perplexity.yaml"), "w") as f:
        f.write(PERPLEXITY.format(data=data["perplexity"]))
    print(
        f"wrote {args.out}: stdlib_next_line ({len(questions)} questions), stdlib_perplexity "
        f"({min(50, len(texts))} files)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
