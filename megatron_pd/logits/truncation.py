"""Top-p-k truncation of teacher logits, vocab-parallel (no full-vocabulary sort).

The paper's "top-p-k": sort the teacher's probabilities (tau = 1) in decreasing order, keep the
smallest prefix whose cumulative probability reaches p, then at most k of them, and at least
``min_k``. Names: ``top-0.95-100``; ``top-0.95-inf`` (no k cap); ``top-1.0-50`` (top-k only).

Vocab-parallel: each rank selects its local top-k' (``torch.topk``, a partial selection) and
computes its local log-sum-exp statistics; ONE all-gather of [N, 2k' + 2] floats per rank
brings every candidate and statistic to every rank, which merges them into the global top-k
and the global normaliser. The kept entries are returned as global token ids and
log-probabilities at tau = 1 under the full distribution (what the loss's sparse teacher and
the offline store take; any tau can be applied later on the kept set).

Shape legend: N tokens, v valid columns of this rank's shard, K kept-entry slots.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from megatron_pd.loss.spec import SparseTeacher
from megatron_pd.models.gpt import VocabInfo
from megatron_pd.parallel.collectives import all_gather_stacked

_NAME = re.compile(r"^top-([0-9.]+)-(inf|[0-9]+)$")
NEG = -1.0e30


@dataclass(frozen=True)
class TruncationSpec:
    """Which teacher entries to keep per token."""

    top_p: float = 0.95
    top_k: int | None = 100
    min_k: int = 1
    k_cap: int = 1024

    def __post_init__(self):
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1 (or None for no cap)")
        if self.min_k < 1:
            raise ValueError(f"min_k={self.min_k}: must be >= 1")
        if self.top_k is not None and self.min_k > self.top_k:
            raise ValueError(f"min_k={self.min_k} exceeds top_k={self.top_k}")
        if self.k_cap < 1:
            raise ValueError(f"k_cap={self.k_cap}: must be >= 1")

    @property
    def slots(self) -> int:
        """K: entry slots per token (top_k, or k_cap when there is no k cap)."""
        return self.top_k if self.top_k is not None else self.k_cap

    @property
    def name(self) -> str:
        k = "inf" if self.top_k is None else str(self.top_k)
        return f"top-{self.top_p:g}-{k}"

    @classmethod
    def parse(cls, name: str, min_k: int = 1, k_cap: int = 1024) -> TruncationSpec:
        """``top-0.95-100`` / ``top-0.95-inf`` / ``top-1.0-50`` -> TruncationSpec."""
        match = _NAME.match(name.strip())
        if not match:
            raise ValueError(
                f"truncation {name!r}: expected top-P-K such as top-0.95-100 or top-0.95-inf"
            )
        p = float(match.group(1))
        k = None if match.group(2) == "inf" else int(match.group(2))
        return cls(top_p=p, top_k=k, min_k=min_k, k_cap=k_cap)


def _keep_counts(logp_sorted_NK: torch.Tensor, spec: TruncationSpec) -> torch.Tensor:
    """How many of the sorted entries to keep per token [N]."""
    probs = logp_sorted_NK.exp()
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the entries ahead of each one
    # Keep an entry while the mass before it is still short of p (float slack: the p = 1 case
    # must not keep the whole cap because of rounding below 1).
    short = before < spec.top_p - (1e-6 if spec.top_p >= 1.0 else 0.0)
    count = short.sum(-1)
    upper = (
        logp_sorted_NK.shape[-1]
        if spec.top_k is None
        else min(spec.top_k, logp_sorted_NK.shape[-1])
    )
    return count.clamp(min=min(spec.min_k, upper), max=upper)


def truncate_dense(
    teacher_logits_NV: torch.Tensor, true_vocab: int, spec: TruncationSpec
) -> SparseTeacher:
    """Single-device reference: full sort of the true vocabulary. [N, K] ids and log-probs."""
    logits = teacher_logits_NV[:, :true_vocab].double()
    logp = torch.log_softmax(logits, -1)
    slots = min(spec.slots, true_vocab)
    values, ids = logp.sort(dim=-1, descending=True)
    values, ids = values[:, :slots], ids[:, :slots]
    return _finish(ids, values, _keep_counts(values, spec), spec.slots)


def _finish(ids, logp, counts, slots):
    position = torch.arange(ids.shape[1], device=ids.device)[None, :]
    kept = position < counts[:, None]
    ids = torch.where(kept, ids, torch.full_like(ids, -1))
    logp = torch.where(kept, logp, torch.zeros_like(logp))
    if ids.shape[1] < slots:  # vocabulary smaller than the slots: pad
        pad = slots - ids.shape[1]
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], dim=1)
        logp = torch.cat([logp, logp.new_zeros(logp.shape[0], pad)], dim=1)
    return SparseTeacher(ids.long(), logp.float())


def truncate_vocab_parallel(
    teacher_logits_Nv: torch.Tensor,
    vocab: VocabInfo,
    spec: TruncationSpec,
    tp_group,
    chunk_tokens: int = 4096,
) -> SparseTeacher:
    """Top-p-k of logits sharded over ``tp_group`` (collective: one all-gather).

    Returns the same SparseTeacher on every rank of the group.
    """
    num_tokens = teacher_logits_Nv.shape[0]
    valid = vocab.valid_in_shard
    k_local = min(spec.slots, valid)
    width = 2 * spec.slots + 2
    rows = torch.empty(num_tokens, width, device=teacher_logits_Nv.device)
    rows[:, : 2 * spec.slots] = NEG
    rows[:, spec.slots : 2 * spec.slots] = -1.0  # candidate ids (as floats, exact below 2^24)
    for start in range(0, num_tokens, chunk_tokens):
        end = min(start + chunk_tokens, num_tokens)
        block = teacher_logits_Nv[start:end, :valid].float()
        if valid == 0:
            rows[start:end, -2] = NEG
            rows[start:end, -1] = 0.0
            continue
        values, local_ids = block.topk(k_local, dim=-1)
        local_max = values[:, 0]
        rows[start:end, :k_local] = values
        rows[start:end, spec.slots : spec.slots + k_local] = (local_ids + vocab.shard_start).float()
        rows[start:end, -2] = local_max
        rows[start:end, -1] = (block - local_max[:, None]).exp().sum(-1)
    gathered = all_gather_stacked(rows, tp_group)  # [R, N, width]
    values = gathered[..., : spec.slots].permute(1, 0, 2).reshape(num_tokens, -1)
    ids = gathered[..., spec.slots : 2 * spec.slots].permute(1, 0, 2).reshape(num_tokens, -1)
    local_max, local_sum = gathered[..., -2], gathered[..., -1]
    global_max = local_max.max(0).values
    lse = global_max + (local_sum * (local_max - global_max).exp()).sum(0).log()
    slots = min(spec.slots, vocab.true_size)
    best, order = values.topk(slots, dim=-1)
    best_ids = ids.gather(1, order).round().long()
    logp = best - lse[:, None]
    return _finish(best_ids, logp, _keep_counts(logp, spec), spec.slots)


def derivable_from(spec: TruncationSpec, stored: TruncationSpec) -> str | None:
    """Why ``spec`` cannot be cut from entries kept under ``stored`` (None: it can, exactly).

    A narrower top-p-k (p' <= p, k' <= k, min_k' <= min_k) of the full distribution is a
    prefix of the stored entries sorted by probability, so it is recovered without the teacher.
    """
    if spec.top_p > stored.top_p:
        return f"p={spec.top_p:g} exceeds the stored p={stored.top_p:g}"
    if stored.top_k is not None and (spec.top_k is None or spec.top_k > stored.top_k):
        return f"k={spec.top_k or 'inf'} exceeds the stored k={stored.top_k}"
    if spec.top_k is None and spec.k_cap > stored.slots:
        return f"k_cap={spec.k_cap} exceeds the stored {stored.slots} slots"
    if spec.min_k > stored.min_k:
        return f"min_k={spec.min_k} exceeds the stored min_k={stored.min_k}"
    return None


def retruncate(teacher: SparseTeacher, spec: TruncationSpec) -> SparseTeacher:
    """The top-p-k ``spec`` of already-truncated entries (see ``derivable_from``).

    Exact for exact log-probs; with a store's quantized values the prefix boundary can move
    where the cumulative mass is within the quantization error of p.
    """
    valid = teacher.valid
    key = torch.where(valid, teacher.logprobs.float(), torch.full_like(teacher.logprobs, NEG))
    values, order = key.sort(dim=-1, descending=True)
    ids = teacher.indices.gather(1, order)
    slots = min(spec.slots, ids.shape[1])
    values, ids = values[:, :slots], ids[:, :slots]
    counts = torch.minimum(_keep_counts(values, spec), valid.sum(-1))
    return _finish(ids, values, counts, spec.slots)


def truncation_stats(teacher: SparseTeacher) -> dict:
    """Mean kept entries per token and mean kept probability mass (tau = 1)."""
    counts = teacher.kept_counts().float()
    mass = torch.where(
        teacher.valid, teacher.logprobs.float().exp(), torch.zeros_like(teacher.logprobs.float())
    ).sum(-1)
    return {
        "kept_per_token": counts.mean().item() if counts.numel() else math.nan,
        "kept_mass": mass.mean().item() if mass.numel() else math.nan,
    }
