"""Dump a frozen teacher's top-p-k logits for every sample of the training data into a store.

``dump_teacher_logits(cfg, store_dir)`` runs in every rank of a torchrun job. The teacher has
its own TP/PP (``distill.teacher``); its data-parallel replicas split the shards between them.
The datasets are built exactly as the student's training run builds them (same config), so
the store's dataset fingerprint is the one the student will compute. Each shard is a
contiguous range of unshuffled sample ids; it is written atomically by the replica's writer
rank (teacher last stage, tp rank 0), and a restarted dump skips shards that exist - the
finished store is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from megatron_pd.logits import store_format as F
from megatron_pd.logits.store import StoreWriter, compare_headers
from megatron_pd.logits.store_format import dataset_header, expected_fields, truncation_header
from megatron_pd.logits.truncation import TruncationSpec, truncate_vocab_parallel

SPLITS = ("train", "valid")


def kl_fidelity(exact_logp: np.ndarray, decoded_logp: np.ndarray, valid: np.ndarray) -> float:
    """Mean KL(exact || decoded) of the renormalised kept-entry distributions (nats/token)."""

    def normalise(x):  # log-softmax over the kept entries; empty slots get a finite filler
        x = np.where(valid, x.astype(np.float64), -1e30)
        top = np.max(x, axis=1, keepdims=True)
        z = np.log(np.sum(np.where(valid, np.exp(x - top), 0.0), axis=1, keepdims=True) + 1e-300)
        return np.where(valid, x - top - z, 0.0)

    p_log, q_log = normalise(exact_logp), normalise(decoded_logp)
    terms = np.where(valid, np.exp(p_log) * (p_log - q_log), 0.0)
    rows = valid.any(axis=1)
    return float(terms.sum(axis=1)[rows].mean()) if rows.any() else 0.0


class _Progress:
    def __init__(self, total_tokens: int, label: str):
        self.total, self.label = total_tokens, label
        self.start = self.last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and (now - self.last < 2.0 or done >= self.total):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        from megatron_pd.engine.metrics import format_duration

        print(
            f"[dump {self.label}] {done:,}/{self.total:,} tokens "
            f"({100 * done / max(self.total, 1):.1f}%) {rate:,.0f} tokens/s "
            f"ETA {format_duration(eta)}",
            file=sys.stdout,
            flush=True,
        )


def dump_teacher_logits(
    cfg,
    store_dir: str,
    splits=SPLITS,
    samples_per_shard: int = 256,
    batch_size: int | None = None,
    value_bits: int = 8,
    logp_range: float = 16.0,
) -> dict:
    """Write ``store_dir/<split>/`` for each split; returns the summary (on every rank)."""
    from megatron_pd.data.datasets import SampleIds, build_splits
    from megatron_pd.data.tokenizer import load_tokenizer, resolve_vocab_size
    from megatron_pd.models.teacher import open_teacher
    from megatron_pd.parallel import topology

    distill = cfg.distill
    if distill.teacher.load is None:
        raise ValueError("distill.teacher.load is not set: the dump needs a teacher")
    if distill.truncation is None:
        raise ValueError(
            "distill.truncation is not set: a store keeps top-p-k entries (e.g. top-0.95-100)"
        )
    if value_bits not in (6, 7, 8):
        raise ValueError(f"value_bits={value_bits}: must be 6, 7 or 8")
    world = dist.get_world_size()
    rank = dist.get_rank()
    cfg.validate_for_world(world)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    vocab_size = resolve_vocab_size(cfg.model, tokenizer)
    groups = topology.init_student_groups(distill.teacher.tp, distill.teacher.pp)
    tp_rank = dist.get_rank(groups.tp)
    teacher, source = open_teacher(
        distill.teacher, groups, vocab_size, tokenizer.fingerprint, cfg.data.seq_length, tp_rank
    )
    teacher_cfg, checkpoint = teacher.cfg, source.checkpoint
    spec = TruncationSpec.parse(distill.truncation, distill.min_k, distill.k_cap)
    gbs, total_steps = cfg.train.global_batch_size, cfg.total_steps()
    eval_samples = cfg.train.eval_batches * gbs if cfg.train.eval_interval else 0
    built = build_splits(
        cfg.data,
        tokenizer,
        (total_steps * gbs, eval_samples, 0),
        cfg.data.cache_dir or os.path.join(store_dir, "data_cache"),
    )
    dp_rank, dp_size = dist.get_rank(groups.dp), dist.get_world_size(groups.dp)
    is_writer = teacher.is_last_stage and tp_rank == 0
    batch = batch_size or cfg.train.micro_batch_size
    teacher_state = source.trainer_state()
    summary = {}
    for split_name in splits:
        dataset = getattr(built, split_name)
        if dataset is None or len(dataset) == 0:
            continue
        ids = SampleIds(dataset)
        header = F.StoreHeader(
            vocab_size=vocab_size,
            tokenizer_fingerprint=tokenizer.fingerprint,
            dataset=dataset_header(ids, split_name, cfg.data),
            teacher={
                "checkpoint": checkpoint,
                "step": teacher_state.get("step"),
                "model": asdict(teacher_cfg),
                "tp": distill.teacher.tp,
                "pp": distill.teacher.pp,
            },
            truncation=truncation_header(spec),
            samples_per_shard=samples_per_shard,
        )
        header.encoding = dict(header.encoding, value_bits=value_bits, logp_range=logp_range)
        split_dir = os.path.join(store_dir, split_name)
        if rank == 0:
            _start_or_resume(split_dir, header)
        dist.barrier()
        writer = StoreWriter(split_dir, header)
        num_shards = math.ceil(ids.total / samples_per_shard)
        meter = _Progress(ids.total * cfg.data.seq_length, split_name) if rank == 0 else None
        done_tokens = 0
        for shard in range(dp_rank, num_shards, dp_size):
            first = shard * samples_per_shard
            members = list(range(first, min(first + samples_per_shard, ids.total)))
            done = torch.tensor([1.0 if is_writer and writer.shard_done(shard) else 0.0])
            dist.all_reduce(done, op=dist.ReduceOp.MAX, group=groups.mp)
            if done.item():  # resumed: this shard was written before
                done_tokens += len(members) * cfg.data.seq_length * dp_size
                continue
            raw_blocks = []
            stats = {"tokens": 0, "kept": 0, "kl_sum": 0.0, "kl_rows": 0}
            for start in range(0, len(members), batch):
                chunk = members[start : start + batch]
                tokens = torch.stack([ids.sample(g)["tokens"] for g in chunk])
                kept = _kept_entries(teacher, tokens, spec, cfg.loss.fused_output_layer)
                if teacher.is_last_stage:
                    if is_writer:
                        kept_ids = kept.indices.view(len(chunk), -1, spec.slots).cpu().numpy()
                        kept_lp = kept.logprobs.view(len(chunk), -1, spec.slots).cpu().numpy()
                        kept_tail = kept.log_tail.view(len(chunk), -1).cpu().numpy()
                        for b in range(len(chunk)):
                            raw_blocks.append(writer.encode(kept_ids[b], kept_lp[b], kept_tail[b]))
                        valid = kept_ids >= 0
                        stats["tokens"] += int(valid.shape[0] * valid.shape[1])
                        stats["kept"] += int(valid.sum())
                        if start == 0:  # value-encoding fidelity on each shard's first batch
                            decoded = F.dequantize(
                                F.quantize(kept_lp, value_bits, logp_range), value_bits, logp_range
                            )
                            flat_valid = valid.reshape(-1, spec.slots)
                            rows = flat_valid.shape[0]
                            stats["kl_sum"] += (
                                kl_fidelity(
                                    kept_lp.reshape(-1, spec.slots),
                                    decoded.reshape(-1, spec.slots),
                                    flat_valid,
                                )
                                * rows
                            )
                            stats["kl_rows"] += rows
                done_tokens += len(chunk) * cfg.data.seq_length * dp_size
                if meter:
                    meter.update(min(done_tokens, meter.total))
            if is_writer:
                writer.write_shard(shard, members, [-1] * len(members), raw_blocks, stats)
        dist.barrier()
        summary[split_name] = _finish(writer, num_shards, rank, meter)
    return summary


def _kept_entries(teacher, tokens_BS, spec: TruncationSpec, fused: bool):
    """Top-p-k of the teacher on a batch (its last stage; None elsewhere): from its hidden
    states chunk by chunk (``fused``), or from its full logits."""
    if fused:
        return teacher.kept_entries(tokens_BS, spec)
    logits = teacher.logits(tokens_BS)
    if logits is None:
        return None
    flat = logits.reshape(-1, logits.shape[-1])
    return truncate_vocab_parallel(flat, teacher.vocab, spec, teacher.groups.tp)


def _start_or_resume(split_dir: str, header: F.StoreHeader) -> None:
    """Write the (incomplete) header, or check a previous dump's header matches."""
    path = os.path.join(split_dir, "header.json")
    if os.path.isfile(path):
        previous = F.StoreHeader.read(split_dir)
        compare_headers(asdict(previous), expected_fields(header), "header")
        if previous.complete:
            return
    header.write(split_dir)


def _finish(writer: StoreWriter, num_shards: int, rank: int, meter) -> dict:
    """Check every shard exists, sum their statistics, mark the split complete (rank 0)."""
    missing = [s for s in range(num_shards) if not os.path.isfile(writer.shard_path(s))]
    if missing:
        raise RuntimeError(f"logits dump finished with missing shards: {missing[:3]}")
    stats, _ = writer.summary()
    if rank == 0:
        writer.header.stats = stats
        writer.finish(num_shards)
        if meter:
            meter.update(meter.total, final=True)
    dist.barrier()
    return stats
