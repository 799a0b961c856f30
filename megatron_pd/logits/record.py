"""The paper's "online logits": a pre-training run records its own top-p-k logits as it trains.

With ``train.record_logits=<store dir>`` a (teacher) pre-training run truncates the logits of
every training micro-batch it computes anyway (vocab-parallel, no extra forward pass) and
writes them, with the training step that produced them, into the same store format a dump
writes (source "pretraining", split "train"). A student then trains from it with
``distill.store``; early-step samples carry early-teacher logits, which is what the paper's
online-logits study compares (``tools/inspect_logits.py`` shows each sample's step).

Each data-parallel writer (last pipeline stage, tp rank 0) buffers encoded samples and writes
a shard whenever the run saves a checkpoint (and at the end), so the store always matches the
latest checkpoint: after a crash, the samples recorded since are recomputed by the resumed
run, and shards of steps beyond the resumed checkpoint are removed.
"""

from __future__ import annotations

import os
import re

import torch.distributed as dist

from megatron_pd.logits import store_format as F
from megatron_pd.logits.store import StoreWriter
from megatron_pd.logits.truncation import (
    TruncationSpec,
    truncate_hidden_vocab_parallel,
    truncate_vocab_parallel,
)

_SHARD = re.compile(r"^shard_r(\d+)_s(\d+)-(\d+)\.pd$")


class LogitRecorder:
    """Records a training run's truncated logits; every method is called on every rank."""

    def __init__(
        self,
        store_dir: str,
        spec: TruncationSpec,
        header: F.StoreHeader,
        vocab,
        tp_group,
        is_last_stage: bool,
        dp_rank: int,
    ):
        self.spec, self.vocab, self.tp_group = spec, vocab, tp_group
        self.split_dir = os.path.join(store_dir, "train")
        self.is_writer = is_last_stage and dist.get_rank(tp_group) == 0
        self.dp_rank = dp_rank
        self.writer = StoreWriter(self.split_dir, header)
        self._buffer: list = []  # (sample id, step, raw block, kept entries)
        self._first_step = None
        if dist.get_rank() == 0 and not os.path.isfile(os.path.join(self.split_dir, "header.json")):
            header.write(self.split_dir)
        dist.barrier()

    def record(self, student, sample_ids, step: int) -> None:
        """Truncate this micro-batch's output (collective over tp) and buffer it.

        ``student`` is the train step's StudentOutput: logits [N, v], or (fused output
        layer) hidden states [N, H] with the output weight shard, truncated chunk by chunk.
        """
        if student.logits is not None:
            kept = truncate_vocab_parallel(
                student.logits.detach(), self.vocab, self.spec, self.tp_group
            )
        else:
            kept = truncate_hidden_vocab_parallel(
                student.hidden.detach(),
                student.weight.detach(),
                self.vocab,
                self.spec,
                self.tp_group,
            )
        if not self.is_writer:
            return
        samples = len(sample_ids)
        ids = kept.indices.view(samples, -1, self.spec.slots).cpu().numpy()
        logp = kept.logprobs.view(samples, -1, self.spec.slots).cpu().numpy()
        log_tail = kept.log_tail.view(samples, -1).cpu().numpy()
        for b, sample in enumerate(sample_ids.tolist()):
            block = self.writer.encode(ids[b], logp[b], log_tail[b])
            self._buffer.append((int(sample), step, block, int((ids[b] >= 0).sum())))
        if self._first_step is None:
            self._first_step = step

    def flush(self, last_step: int) -> None:
        """Write the buffered samples as this rank's shard for steps up to ``last_step``."""
        from megatron_pd.platform.faults import fault

        fault("record_flush", last_step)
        if self.is_writer and self._buffer:
            name = f"r{self.dp_rank:03d}_s{self._first_step:07d}-{last_step:07d}"
            tokens = sum(1 for _ in self._buffer) * self.writer.header.dataset["seq_length"]
            stats = {
                "tokens": tokens,
                "kept": sum(b[3] for b in self._buffer),
                "kl_sum": 0.0,
                "kl_rows": 0,
            }
            self.writer.write_shard(
                name,
                [b[0] for b in self._buffer],
                [b[1] for b in self._buffer],
                [b[2] for b in self._buffer],
                stats,
            )
        self._buffer, self._first_step = [], None

    def discard_after(self, step: int) -> None:
        """On resume from ``step``: drop this rank's shards recorded past it."""
        if not self.is_writer or not os.path.isdir(self.split_dir):
            return
        for name in os.listdir(self.split_dir):
            match = _SHARD.match(name)
            if match and int(match.group(1)) == self.dp_rank and int(match.group(3)) > step:
                os.remove(os.path.join(self.split_dir, name))

    def finish(self, last_step: int) -> None:
        """Flush, then (rank 0) mark the store complete with statistics from the shards."""
        self.flush(last_step)
        dist.barrier()
        if dist.get_rank() == 0:
            self.writer.remove_leftovers()
            self.writer.header.stats, shards = self.writer.summary()
            self.writer.finish(shards)
        dist.barrier()
