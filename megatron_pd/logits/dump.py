"""Dump a frozen teacher's top-p-k logits for the samples a training run reads into a store.

``dump_teacher_logits(cfg, store_dir)`` runs in every rank of a torchrun job. The teacher has
its own TP/PP (``distill.teacher``); its data-parallel replicas split the shards between them.
The datasets are built exactly as the student's training run builds them (same config), so
the store's dataset fingerprint is the one the student will compute.

What is dumped (``coverage``): ``run`` (the default) - exactly the samples the config's run
reads: the first train_steps x global_batch_size positions of the train split's order and the
validation batches; ``split`` - every sample of each split. A dump is a *segment*: the needed
samples the store does not hold yet, by ascending sample id, cut into shards of
``samples_per_shard``. Dumping again with more train steps (same data, so the same dataset
fingerprint) adds a segment with only the missing samples: a store is extended, never
rewritten. Each shard is written atomically by the replica's writer rank (teacher last stage,
tp rank 0); a restarted dump finishes its unfinished segment first (the plan is recomputed
identically from the header) and skips the shards that exist, so the finished store is
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_pd.logits import store_format as F
from megatron_pd.logits.store import StoreWriter, compare_headers
from megatron_pd.logits.store_format import dataset_header, expected_fields, truncation_header
from megatron_pd.logits.truncation import TruncationSpec, truncate_vocab_parallel
from megatron_pd.parallel.collectives import any_rank

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
    coverage: str = "run",
) -> dict:
    """Write ``store_dir/<split>/`` for each split; returns the summary (on every rank).
    Collective; the store directory is locked for the job (platform/run_lock.py)."""
    distill = cfg.distill
    if distill.teacher.load is None:
        raise ValueError("distill.teacher.load is not set: the dump needs a teacher")
    if distill.truncation is None:
        raise ValueError(
            "distill.truncation is not set: a store keeps top-p-k entries (e.g. top-0.95-100)"
        )
    if value_bits not in (6, 7, 8):
        raise ValueError(f"value_bits={value_bits}: must be 6, 7 or 8")
    if coverage not in ("run", "split"):
        raise ValueError(f"coverage={coverage!r}: must be run or split")
    world = dist.get_world_size()
    rank = dist.get_rank()
    cfg.validate_for_world(world)
    from megatron_pd.platform.run_lock import job_lock

    with job_lock(store_dir, rank, "logits store"):
        from megatron_pd.data.datasets import SampleIds, build_splits
        from megatron_pd.data.tokenizer import load_tokenizer, resolve_vocab_size
        from megatron_pd.models.teacher import open_teacher
        from megatron_pd.parallel import topology

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
        job = _DumpJob(
            teacher=teacher,
            spec=spec,
            groups=groups,
            seq_length=cfg.data.seq_length,
            batch=batch_size or cfg.train.micro_batch_size,
            fused=cfg.loss.fused_output_layer,
            is_writer=teacher.is_last_stage and tp_rank == 0,
            value_bits=value_bits,
            logp_range=logp_range,
        )
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
            positions = {"train": total_steps * gbs, "valid": eval_samples}[split_name]
            needed = needed_samples(ids, positions if coverage == "run" else None)
            if rank == 0:
                _start_or_resume(split_dir, header)
            dist.barrier()
            previous = F.StoreHeader.read(split_dir)
            writer = StoreWriter(split_dir, previous)
            for segment in plan_segments(split_dir, previous, needed, samples_per_shard):
                done = _dump_segment(job, segment, ids, writer, split_name)
                summary[split_name] = _finish_segment(writer, segment, rank, done)
            if split_name not in summary:  # nothing was missing
                summary[split_name] = previous.stats
                if rank == 0:
                    print(f"[dump {split_name}] the store holds every sample already", flush=True)
        return summary


def needed_samples(ids, positions: int | None) -> np.ndarray:
    """Sorted unique unshuffled ids of a split's first ``positions`` samples in training order
    (as the trainer reads them: positions beyond the split wrap around); all with None."""
    if positions is None:
        return np.arange(ids.total, dtype=np.int64)
    order = np.arange(positions, dtype=np.int64) % max(ids.total, 1)
    return np.unique(ids.of(order))


def plan_segments(split_dir: str, header: F.StoreHeader, needed: np.ndarray, per_shard: int):
    """The segments still to write: an unfinished one (its recorded sample list), then one
    for the needed samples the store does not hold. Each is {"index", "positions",
    "samples" (ids, ascending), "shards", "per_shard"}."""
    out, held = [], [_legacy_samples(split_dir, header)]
    for index, segment in enumerate(header.segments):
        samples = _read_samples(split_dir, segment["file"])
        held.append(samples)
        if not segment["complete"]:
            out.append(
                {
                    "index": index,
                    "positions": segment["positions"],
                    "samples": samples,
                    "per_shard": segment["per_shard"],
                }
            )
    missing = np.setdiff1d(needed, np.unique(np.concatenate(held)))
    if missing.size:
        out.append(
            {"index": len(header.segments), "positions": int(needed.size), "samples": missing}
        )
    for segment in out:
        segment.setdefault("per_shard", per_shard)
        segment["shards"] = -(-len(segment["samples"]) // segment["per_shard"])
    return out


def _read_samples(split_dir: str, name: str) -> np.ndarray:
    path = os.path.join(split_dir, name)
    try:
        return np.load(path, allow_pickle=False).astype(np.int64)
    except (OSError, ValueError) as err:
        raise ValueError(f"logits store segment list {path} is unreadable ({err})") from None


def _legacy_samples(split_dir: str, header: F.StoreHeader) -> np.ndarray:
    """Samples of a store written before segments existed (its shard files' ids)."""
    if header.segments or not os.path.isdir(split_dir):
        return np.zeros(0, dtype=np.int64)
    ids = [
        F.ShardFile(os.path.join(split_dir, n)).sample_ids.astype(np.int64)
        for n in sorted(os.listdir(split_dir))
        if n.startswith("shard_") and n.endswith(".pd")
    ]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)


def _shard_name(segment: dict, shard: int) -> str:
    # the first segment keeps the original names (shard_00000.pd ...), later ones are apart
    return f"{shard:05d}" if segment["index"] == 0 else f"s{segment['index']:03d}_{shard:05d}"


@dataclass
class _DumpJob:
    """What every segment of a dump job shares: the teacher on this rank, the cut, the
    process groups, the batch sizes, the value encoding and whether this rank writes shards
    (its replica's last stage, tp rank 0)."""

    teacher: object
    spec: TruncationSpec
    groups: object
    seq_length: int
    batch: int
    fused: bool
    is_writer: bool
    value_bits: int
    logp_range: float


def _dump_segment(job: _DumpJob, segment: dict, ids, writer: StoreWriter, split_name: str) -> dict:
    """Write this replica's shards of one segment (round-robin over the DP replicas)."""
    rank = dist.get_rank()
    dp_rank, dp_size = dist.get_rank(job.groups.dp), dist.get_world_size(job.groups.dp)
    samples, per_shard = segment["samples"], segment["per_shard"]
    if rank == 0 and segment["index"] == len(writer.header.segments):
        _record_segment_plan(writer, segment)
    dist.barrier()
    meter = _Progress(len(samples) * job.seq_length, split_name) if rank == 0 else None
    done_tokens = 0
    for shard in range(dp_rank, segment["shards"], dp_size):
        members = samples[shard * per_shard : (shard + 1) * per_shard].tolist()
        name = _shard_name(segment, shard)
        # resumed: this shard was written before (its writer tells the model-parallel group)
        if any_rank(job.is_writer and writer.shard_done(name), job.groups.mp):
            done_tokens += len(members) * job.seq_length * dp_size
            continue
        raw_blocks = []
        stats = {"tokens": 0, "kept": 0, "kl_sum": 0.0, "kl_rows": 0}
        for start in range(0, len(members), job.batch):
            chunk = members[start : start + job.batch]
            tokens = torch.stack([ids.sample(g)["tokens"] for g in chunk])
            kept = _kept_entries(job.teacher, tokens, job.spec, job.fused)
            if job.is_writer:
                _encode_batch(job, writer, kept, len(chunk), start == 0, raw_blocks, stats)
            done_tokens += len(chunk) * job.seq_length * dp_size
            if meter:
                meter.update(min(done_tokens, meter.total))
        if job.is_writer:
            writer.write_shard(name, members, [-1] * len(members), raw_blocks, stats)
    dist.barrier()
    if meter:
        meter.update(meter.total, final=True)
    return {"shards": [_shard_name(segment, s) for s in range(segment["shards"])]}


def _record_segment_plan(writer: StoreWriter, segment: dict) -> None:
    """Rank 0, before any shard of a new segment: its sample list and an incomplete entry in
    the header, so that a restart finishes exactly this segment."""
    import io

    name = f"segment_{segment['index']:03d}.npy"
    buffer = io.BytesIO()
    np.save(buffer, segment["samples"].astype(np.int64), allow_pickle=False)
    F.write_atomic(os.path.join(writer.split_dir, name), buffer.getvalue())
    header = writer.header
    header.segments.append(
        {
            "file": name,
            "positions": segment["positions"],
            "samples": int(len(segment["samples"])),
            "shards": segment["shards"],
            "per_shard": segment["per_shard"],
            "complete": False,
        }
    )
    header.complete = False
    header.write(writer.split_dir)


def _encode_batch(job, writer, kept, num_samples, first, raw_blocks, stats) -> None:
    """Append a batch's kept entries to the shard's encoded blocks and statistics; on a
    shard's ``first`` batch also measure the value encoding's fidelity (KL of the decoded
    entries)."""
    slots = job.spec.slots
    kept_ids = kept.indices.view(num_samples, -1, slots).cpu().numpy()
    kept_lp = kept.logprobs.view(num_samples, -1, slots).cpu().numpy()
    kept_tail = kept.log_tail.view(num_samples, -1).cpu().numpy()
    for b in range(num_samples):
        raw_blocks.append(writer.encode(kept_ids[b], kept_lp[b], kept_tail[b]))
    valid = kept_ids >= 0
    stats["tokens"] += int(valid.shape[0] * valid.shape[1])
    stats["kept"] += int(valid.sum())
    if first:
        bits, span = job.value_bits, job.logp_range
        decoded = F.dequantize(F.quantize(kept_lp, bits, span), bits, span)
        flat_valid = valid.reshape(-1, slots)
        rows = flat_valid.shape[0]
        fidelity = kl_fidelity(kept_lp.reshape(-1, slots), decoded.reshape(-1, slots), flat_valid)
        stats["kl_sum"] += fidelity * rows
        stats["kl_rows"] += rows


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
    if os.path.isfile(path):  # resume or extend: the same samples, teacher and encoding
        previous = F.StoreHeader.read(split_dir)
        compare_headers(asdict(previous), expected_fields(header), "header")
        checkpoint = {"checkpoint": header.teacher["checkpoint"]}
        compare_headers(previous.teacher, checkpoint, "header.teacher")
        return
    header.write(split_dir)


def _finish_segment(writer: StoreWriter, segment: dict, rank: int, done: dict) -> dict:
    """Check the segment's shards exist, mark it (and the split) complete, sum the statistics
    of every shard of the store (rank 0 writes the header)."""
    missing = [n for n in done["shards"] if not os.path.isfile(writer.shard_path(n))]
    if missing:
        raise RuntimeError(f"logits dump finished with missing shards: {missing[:3]}")
    stats, num_shards = writer.summary()
    if rank == 0:
        writer.remove_leftovers()
        header = writer.header
        header.segments[segment["index"]]["complete"] = True
        header.stats = stats
        header.num_shards = num_shards
        header.complete = all(s["complete"] for s in header.segments)
        header.write(writer.split_dir)
    dist.barrier()
    return stats
