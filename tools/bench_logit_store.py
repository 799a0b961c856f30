"""Benchmark the offline logits store on the quickstart's stdlib teacher, side by side.

    python tools/bench_logit_store.py                  # needs runs/quickstart/teacher
    python tools/bench_logit_store.py --teacher RUN_DIR --samples 256

Prints, on ``--samples`` samples of held-out stdlib code:
  * bytes per token and kept entries per token for top-0.95-{inf,100,50}, top-1.0-{100,50}
    and top-0.95-1, next to a plain int32-index + fp16-value layout and the paper's ~150
    bytes/token (top-0.95-100 over a 151,552-token vocabulary);
  * the value encoding's fidelity: mean KL between decoded and exact truncated teacher
    distributions at 6, 7 and 8 bits;
  * reader decode throughput on one core (cold cache, random order);
  * offline PD step time / LM-only step time of the quickstart student (target <= 1.10),
    on a store dumped here for a small corpus.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TRUNCATIONS = [
    "top-0.95-inf",
    "top-0.95-100",
    "top-0.95-50",
    "top-1.0-100",
    "top-1.0-50",
    "top-0.95-1",
]
PAPER_BYTES_PER_TOKEN = 150


def _teacher(run_dir: str):
    import torch.distributed as dist

    from megatron_pd.config.loader import load_config
    from megatron_pd.config.schema import TeacherConfig
    from megatron_pd.data.tokenizer import load_tokenizer
    from megatron_pd.models.teacher import TeacherSource, open_teacher
    from megatron_pd.parallel import topology

    run_cfg = load_config(TeacherSource(run_dir).run_config)
    groups = topology.init_student_groups(1, 1)
    tokenizer = load_tokenizer(run_cfg.data.tokenizer_model)
    teacher, _ = open_teacher(
        TeacherConfig(load=run_dir, precision="fp32"),
        groups,
        tokenizer.vocab_size,
        tokenizer.fingerprint,
        run_cfg.data.seq_length,
        0,
    )
    return teacher, run_cfg, tokenizer, dist.group.WORLD


def _samples(prefix: str, count: int, seq: int) -> torch.Tensor:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    flat = np.concatenate([dataset[i] for i in range(len(dataset) - 1, -1, -1)])[
        : count * seq
    ].astype(np.int64)  # the last documents: held out by the 98/2 split
    return torch.from_numpy(flat).view(count, seq)


def _shard_bytes(
    entries_ids, entries_logp, entries_tail, per_shard: int, bits: int, vocab: int
) -> int:
    from megatron_pd.logits import store_format as F
    from megatron_pd.logits.store import compress_blocks

    samples, seq, slots = entries_ids.shape
    codec = F.BlockCodec(seq, slots, F.id_bytes_for(vocab), bits, 16.0, vocab, tail=True)
    blocks = [
        codec.encode(entries_ids[i], entries_logp[i], entries_tail[i]) for i in range(samples)
    ]
    total = 0
    for start in range(0, len(blocks), per_shard):
        dictionary, compressed = compress_blocks(blocks[start : start + per_shard], 9)
        index = len(compressed) * (8 + 8 + 8 + 4) + 8
        total += len(dictionary) + sum(len(c) for c in compressed) + index + 200
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=os.path.join(REPO, "runs", "quickstart", "teacher"))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=256, help="the dump's default")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    from megatron_pd.logits.dump import kl_fidelity
    from megatron_pd.logits.truncation import TruncationSpec, truncate_vocab_parallel
    from megatron_pd.parallel import topology
    from megatron_pd.platform import quiet_known_warnings

    quiet_known_warnings()
    torch.set_num_threads(2)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29591")
    topology.init_distributed()
    if not os.path.isdir(args.teacher):
        print(f"error: no teacher at {args.teacher} (run the quickstart first)", file=sys.stderr)
        return 2
    teacher, run_cfg, tokenizer, group = _teacher(args.teacher)
    seq = run_cfg.data.seq_length
    tokens = _samples(run_cfg.data.blend[-1], args.samples, seq)
    logits = torch.cat([teacher.logits(tokens[i : i + 16]) for i in range(0, len(tokens), 16)])
    flat = logits.reshape(-1, logits.shape[-1])
    vocab = teacher.vocab.true_size
    print(f"teacher {args.teacher}: V={vocab}, {args.samples} held-out samples x {seq} tokens")
    id_bits = (vocab - 1).bit_length()
    print(
        "\n| truncation | kept/token | store bytes/token | int32+fp16 bytes/token | "
        f"{id_bits}-bit id+fp16 bytes/token | store/int32+fp16 | vs fp32 full logits |"
    )
    print("|---|---|---|---|---|---|---|")
    kept_100 = None
    for name in TRUNCATIONS:
        spec = TruncationSpec.parse(name, k_cap=vocab)
        kept = truncate_vocab_parallel(flat, teacher.vocab, spec, group)
        ids = kept.indices.view(args.samples, seq, -1).numpy()
        logp = kept.logprobs.view(args.samples, seq, -1).numpy()
        tail = kept.log_tail.view(args.samples, seq).numpy()
        per_token = (ids >= 0).sum() / (args.samples * seq)
        stored = _shard_bytes(ids, logp, tail, args.per_shard, 8, vocab) / (args.samples * seq)
        plain = per_token * 6 + 2  # int32 id + fp16 value per entry, a uint16 count per token
        packed = per_token * (id_bits / 8 + 2) + 2  # ceil(log2 V)-bit ids, fp16 values
        print(
            f"| {name} | {per_token:.1f} | {stored:.1f} | {plain:.1f} | {packed:.1f} | "
            f"{stored / plain:.2f} | {vocab * 4 / stored:.0f}x |"
        )
        if name == "top-0.95-100":
            kept_100 = (ids, logp, per_token, stored, tail)
    print(
        f"\npaper: ~{PAPER_BYTES_PER_TOKEN} bytes/token at top-0.95-100 (38 kept entries, "
        f"V=151,552); here {kept_100[3]:.1f} bytes/token with {kept_100[2]:.1f} kept entries "
        f"(target <= 120)"
    )
    from megatron_pd.logits import store_format as F

    ids, logp, tail = kept_100[0], kept_100[1], kept_100[4]
    valid = ids.reshape(-1, ids.shape[-1]) >= 0
    print("\nvalue encoding fidelity at top-0.95-100 (mean KL(exact || decoded), nats/token):")
    for bits in (8, 7, 6):
        decoded = F.dequantize(F.quantize(logp, bits, 16.0), bits, 16.0)
        kl = kl_fidelity(logp.reshape(valid.shape), decoded.reshape(valid.shape), valid)
        size = _shard_bytes(ids, logp, tail, args.per_shard, bits, vocab) / (args.samples * seq)
        print(f"  {bits} bits: KL {kl:.2e}, {size:.1f} bytes/token")
    _tail_fidelity(ids, logp, tail)
    _decode_throughput(ids, logp, tail, seq, vocab, args)
    _step_times(args, run_cfg)
    return 0


def _tail_fidelity(ids, logp, tail) -> None:
    """The teacher's tail mass r per token: stored as fp16 log r vs derived from the 8-bit
    values (what a format-1 store had), against the exact r of the truncation."""
    from megatron_pd.logits import store_format as F

    valid = ids >= 0
    exact = np.exp(tail.astype(np.float64))
    stored = np.exp(tail.astype(np.float16).astype(np.float64))
    decoded = np.where(valid, np.exp(F.dequantize(F.quantize(logp, 8, 16.0), 8, 16.0)), 0.0)
    derived = np.clip(1.0 - decoded.sum(-1, dtype=np.float64), 0.0, 1.0)
    for name, value in (("fp16 log r field", stored), ("1 - sum(8-bit values)", derived)):
        error = np.abs(value - exact)
        relative = error / np.maximum(exact, 1e-300)
        print(
            f"  tail mass from {name}: max |error| {error.max():.2e}, median relative "
            f"{np.median(relative):.2e}, tokens off by > 10%: {(relative > 0.1).mean():.1%} "
            f"(median r {np.median(exact):.3g}, smallest {exact.min():.3g})"
        )


def _decode_throughput(ids, logp, tail, seq, vocab, args) -> None:
    """Reader decode rate per core (CPU time of the reading thread): no sample cache, random
    sample order, the store in the page cache; samples read one at a time and in
    micro-batches (as a training run reads them: one padding pass per micro-batch). At the
    stdlib teacher's 128-token samples, and at 2048-token samples (16 of them joined: a real
    run's sequence length, where per-sample overheads amortise)."""
    from megatron_pd.logits import store_format as F
    from megatron_pd.logits.store import StoreReader, StoreWriter

    torch.set_num_threads(1)
    print("\nreader decode, one core, random order, no cache (target >= 500,000 tokens/s):")
    for join in (1, 16):
        samples = ids.shape[0] // join
        joined_ids = ids[: samples * join].reshape(samples, join * seq, -1)
        joined_logp = logp[: samples * join].reshape(samples, join * seq, -1)
        joined_tail = tail[: samples * join].reshape(samples, join * seq)
        with tempfile.TemporaryDirectory() as tmp:
            header = F.StoreHeader(
                vocab_size=vocab,
                tokenizer_fingerprint="bench",
                dataset={"seq_length": join * seq},
                teacher={},
                truncation={"slots": ids.shape[-1]},
            )
            writer = StoreWriter(tmp, header)
            shards = 0
            per_shard = max(args.per_shard // join, 8)
            for start in range(0, samples, per_shard):
                members = list(range(start, min(start + per_shard, samples)))
                blocks = [
                    writer.encode(joined_ids[i], joined_logp[i], joined_tail[i]) for i in members
                ]
                writer.write_shard(shards, members, [-1] * len(members), blocks)
                shards += 1
            writer.finish(shards)
            rates = {"one at a time": [], "micro-batches of 8": []}
            for repeat in range(7):
                reader = StoreReader(tmp, cache_samples=0)
                order = list(range(samples))
                random.Random(repeat).shuffle(order)
                for mode, batch in (("one at a time", 1), ("micro-batches of 8", 8)):
                    start = time.process_time()  # CPU seconds of this one thread: per core
                    for first in range(0, len(order), batch):
                        reader.get_many(order[first : first + batch])
                    rates[mode].append(samples * join * seq / (time.process_time() - start))
                reader.close()
        print(
            f"  {join * seq}-token samples: "
            + ", ".join(f"{m} {statistics.median(r):,.0f}" for m, r in rates.items())
            + " tokens/s"
        )
    torch.set_num_threads(2)


def _step_times(args, run_cfg) -> None:
    """Offline PD vs LM-only step of the quickstart student on a store dumped here."""
    from megatron_pd.config.loader import load_config
    from megatron_pd.data.corpus import stdlib_corpus_files
    from megatron_pd.data.datasets import GlobalBatchSampler, SampleIds, build_splits
    from megatron_pd.data.datasets import microbatches as make_microbatches
    from megatron_pd.data.preprocess import preprocess
    from megatron_pd.data.tokenizer import load_tokenizer
    from megatron_pd.engine.distill_module import DistillTrainModule
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.logits.dump import dump_teacher_logits
    from megatron_pd.parallel import topology
    from megatron_pd.train import _absolute_paths

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "small_text_document")
        preprocess(stdlib_corpus_files()[:16], prefix, run_cfg.data.tokenizer_model, progress=False)
        base = [
            f"--data.tokenizer_model={run_cfg.data.tokenizer_model}",
            f"--data.blend=[{prefix}]",
            f"--data.cache_dir={tmp}/cache",
            "--data.split=100,0,0",
            f"--train.train_steps={args.steps + 2}",
            "--train.eval_interval=0",
            f"--run_dir={tmp}/run",
        ]
        config = os.path.join(REPO, "examples", "configs", "quickstart_pd.yaml")
        dump_cfg = load_config(
            config,
            base + [f"--distill.teacher.load={args.teacher}", "--distill.truncation=top-0.95-100"],
        )
        _absolute_paths(dump_cfg)
        start = time.perf_counter()
        summary = dump_teacher_logits(dump_cfg, f"{tmp}/store", ("train",), 256)["train"]
        print(
            f"\ndumped {summary['tokens']:,} tokens in {time.perf_counter() - start:.0f}s: "
            f"{summary['kept_per_token']:.1f} kept/token, {summary['bytes_per_token']:.1f} "
            f"bytes/token"
        )
        lm_cfg = load_config(config, base + ["--distill.teacher.load=null"])
        pd_cfg = load_config(config, base + [f"--distill.store={tmp}/store"])
        groups = topology.init_student_groups(1, 1)
        tokenizer = load_tokenizer(lm_cfg.data.tokenizer_model)
        gbs = lm_cfg.train.global_batch_size
        splits = build_splits(
            lm_cfg.data, tokenizer, ((args.steps + 2) * gbs, 0, 0), f"{tmp}/cache"
        )
        ids = SampleIds(splits.train)
        lm = TrainModule(lm_cfg, groups, tokenizer.vocab_size, 1)
        pd = DistillTrainModule(
            pd_cfg,
            groups,
            tokenizer.vocab_size,
            1,
            tokenizer.fingerprint,
            {"train": ids.fingerprint()},
        )
        sampler = GlobalBatchSampler(gbs, lm_cfg.train.micro_batch_size, 1, 0)
        times = {"lm": [], "pd": []}

        def step_batches(step):
            return [
                dict(b, split="train")
                for b in make_microbatches(splits.train, sampler, step * gbs, ids)
            ]

        batches = step_batches(0)
        for step in range(args.steps + 1):
            upcoming = step_batches(step + 1)  # decoded in the background, as the trainer does
            pd.prefetch("train", np.concatenate([b["sample_ids"].numpy() for b in upcoming]))
            order = [("lm", lm, {}), ("pd", pd, {"alpha": 0.9, "tau": 1.0})]
            for name, module, kwargs in order if step % 2 else order[::-1]:
                start = time.perf_counter()
                module.train_step(batches, 1e-4, **kwargs)
                if step:
                    times[name].append(time.perf_counter() - start)
            batches = upcoming
        lm_s, pd_s = statistics.median(times["lm"]), statistics.median(times["pd"])
        # each step's PD and LM steps run back to back: their ratio cancels slow drifts
        ratios = sorted(p / q for p, q in zip(times["pd"], times["lm"]))
        quartiles = statistics.quantiles(ratios, n=4)
        print(
            f"offline PD step {pd_s:.3f}s vs LM-only step {lm_s:.3f}s (medians of {args.steps}); "
            f"per-step ratio median {statistics.median(ratios):.3f}, quartiles "
            f"{quartiles[0]:.3f}-{quartiles[2]:.3f} (target <= 1.10; quickstart student, "
            f"global batch {gbs} x {lm_cfg.data.seq_length}, store read with prefetch)"
        )


if __name__ == "__main__":
    sys.exit(main())
