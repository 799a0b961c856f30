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
import warnings
from dataclasses import dataclass

import torch

from megatron_pd.loss.fused_linear import chunk_logits, default_fused_chunk, transposed_gemms
from megatron_pd.loss.spec import SparseTeacher
from megatron_pd.parallel.collectives import all_gather_stacked
from megatron_pd.parallel.vocab import VocabInfo

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


class TruncationCapWarning(UserWarning):
    """A top-p-inf truncation hit its k_cap before reaching p on some tokens."""


_cap_warned: set = set()  # truncation names already warned about (once per process)


def order_entries(values_NC: torch.Tensor, ids_NC: torch.Tensor) -> tuple:
    """Each row's entries sorted by (value descending, id ascending); empty slots (id -1) last.

    The one tie rule of every truncation: equal probabilities keep the lowest token ids, so
    every layout (TP size, shard boundaries, slot order of a store) keeps the same set.
    """
    by_id = torch.where(ids_NC >= 0, ids_NC, torch.full_like(ids_NC, torch.iinfo(torch.int64).max))
    order = by_id.argsort(dim=-1, stable=True)
    values_NC, ids_NC = values_NC.gather(1, order), ids_NC.gather(1, order)
    key = torch.where(ids_NC >= 0, values_NC, torch.full_like(values_NC, -math.inf))
    order = key.argsort(dim=-1, descending=True, stable=True)
    return values_NC.gather(1, order), ids_NC.gather(1, order)


def _keep_counts(logp_sorted_NK: torch.Tensor, spec: TruncationSpec) -> torch.Tensor:
    """How many of the sorted entries to keep per token [N].

    top_p = 1 keeps exactly min(k, slots) entries (top-k). For p < 1 an entry is kept while the
    mass of the entries ahead of it, summed in float64 from the fp32 (or float64) log-probs,
    is strictly below p; at least ``min_k`` are kept. Entries of probability 0 (logit -inf)
    are never kept.
    """
    slots = logp_sorted_NK.shape[-1]
    upper = slots if spec.top_k is None else min(spec.top_k, slots)
    nonzero = (logp_sorted_NK > -math.inf).sum(-1)
    if spec.top_p >= 1.0:
        count = torch.full_like(nonzero, upper)
    else:
        probs = logp_sorted_NK.double().exp()
        before = torch.cumsum(probs, dim=-1) - probs  # exact prefix sums of few entries
        count = (before < spec.top_p).sum(-1).clamp(min=min(spec.min_k, upper), max=upper)
    return torch.minimum(count, nonzero)


def _warn_if_capped(logp_sorted_NK, counts_N, spec: TruncationSpec) -> None:
    """Warn once per truncation name when top-p-inf stopped at k_cap short of p."""
    if spec.top_k is not None or spec.name in _cap_warned or not counts_N.numel():
        return
    probs = logp_sorted_NK.double().exp()
    kept = torch.where(
        torch.arange(probs.shape[-1], device=probs.device) < counts_N[:, None], probs, 0.0
    )
    mass = kept.sum(-1)
    capped = (counts_N >= spec.k_cap) & (mass < spec.top_p)
    if capped.any():
        _cap_warned.add(spec.name)
        warnings.warn(
            TruncationCapWarning(
                f"{spec.name} is capped at k_cap={spec.k_cap} entries per token: "
                f"{capped.float().mean().item():.1%} of tokens stopped there with kept mass "
                f"{mass[capped].min().item():.3f} (lowest) where p={spec.top_p:g} was asked; "
                "raise distill.k_cap or give a k"
            ),
            stacklevel=3,
        )


def _check_some_mass(top_N: torch.Tensor) -> None:
    """A row whose largest logit is -inf has probability nowhere: an error, not an empty
    row that claims nothing was dropped."""
    empty = torch.isneginf(top_N)
    if empty.any():
        row = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"teacher logits are -inf at every column of token row {row}: the teacher gives "
            "it no probability anywhere"
        )


def _cut(ids_NC, logp_NC, log_rest_N, spec: TruncationSpec) -> SparseTeacher:
    """Keep the first counts of sorted candidates; log_tail from the rest (float64 inputs).

    ``log_rest_N``: log of the mass outside the candidates (-inf when they are everything).
    """
    slots = min(spec.slots, logp_NC.shape[1])
    counts = _keep_counts(logp_NC[:, :slots], spec)
    _warn_if_capped(logp_NC[:, :slots], counts, spec)
    position = torch.arange(logp_NC.shape[1], device=logp_NC.device)[None, :]
    dropped = torch.where(position >= counts[:, None], logp_NC, -math.inf)
    log_tail = torch.logaddexp(torch.logsumexp(dropped, dim=-1), log_rest_N)
    kept = position[:, :slots] < counts[:, None]
    ids = torch.where(kept, ids_NC[:, :slots], torch.full_like(ids_NC[:, :slots], -1))
    logp = torch.where(kept, logp_NC[:, :slots], torch.zeros_like(logp_NC[:, :slots]))
    if slots < spec.slots:  # vocabulary smaller than the slots: pad
        pad = spec.slots - slots
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], dim=1)
        logp = torch.cat([logp, logp.new_zeros(logp.shape[0], pad)], dim=1)
    return SparseTeacher(ids.long(), logp.float(), log_tail.float())


def truncate_dense(
    teacher_logits_NV: torch.Tensor, true_vocab: int, spec: TruncationSpec
) -> SparseTeacher:
    """Single-device reference: a full stable sort of the true vocabulary in float64."""
    logits = teacher_logits_NV[:, :true_vocab].double()
    # stable descending sort: ties keep the lowest ids (order_entries' rule)
    values, ids = logits.sort(dim=-1, descending=True, stable=True)
    _check_some_mass(values[:, 0])
    top = values[:, :1].clamp_min(NEG)
    # log-probs as (x - max) - log1p(mass below the maximum): the top entry is -r, not 0
    logp = values - top - torch.log1p((values[:, 1:] - top).exp().sum(-1, keepdim=True))
    rest = torch.full(values.shape[:1], -math.inf, dtype=values.dtype, device=values.device)
    return _cut(ids, logp, rest, spec)


def _local_candidates(block_Cv: torch.Tensor, k_local: int) -> tuple:
    """This shard's k_local best columns (ties: lowest column) and the mass of the rest.

    Returns (values [C, k_local] fp32 descending, local ids [C, k_local], rest_max [C],
    rest_sum [C]): the rest's largest logit and sum exp(x - rest_max) over the columns not
    chosen, summed directly (never as a difference, which cancels in fp32 when the rest is
    1e-10 of the mass).
    """
    num, valid = block_Cv.shape
    take = min(k_local + 1, valid)
    values, ids = block_Cv.topk(take, dim=-1)
    if take > k_local:
        rest_max = values[:, k_local].clone()
        threshold = values[:, k_local - 1]
        # topk picks any of several entries tied at the boundary; redo those rows by id
        tied = (rest_max == threshold).nonzero()[:, 0]
        if tied.numel():
            _lowest_ids_at_ties(block_Cv, values, ids, tied, threshold, k_local)
        values, ids = values[:, :k_local], ids[:, :k_local]
        safe_max = rest_max.clamp_min(NEG)
        spread = torch.sub(block_Cv, safe_max[:, None]).clamp_max_(0.0).exp_()
        spread.scatter_(1, ids, 0.0)  # the chosen columns (all >= rest_max) are not the rest
        rest_sum = spread.sum(-1)
    else:
        rest_max = torch.full((num,), NEG, device=block_Cv.device)
        rest_sum = torch.zeros(num, device=block_Cv.device)
    return values, ids, rest_max, rest_sum


def _lowest_ids_at_ties(block_Cv, values, ids, tied, threshold, k_local) -> None:
    """In the ``tied`` rows, make the chosen entries equal to the threshold the lowest ids.

    topk's output is sorted, so a row's entries above the threshold come first (n_above of
    them, all chosen by any rule); the remaining k_local - n_above slots take the columns equal
    to the threshold in ascending order: one comparison pass and one nonzero over those rows.
    """
    level = threshold[tied]
    n_above = (values[tied, :k_local] > level[:, None]).sum(-1)
    if tied.numel() * 8 > block_Cv.shape[0]:  # many tied rows (bf16): compare in place
        equal = (block_Cv == threshold[:, None])[tied]
    else:
        equal = block_Cv.index_select(0, tied) == level[:, None]
    where = equal.nonzero()  # [M, 2] row-major: columns ascending within each row
    row = where[:, 0]
    counts = torch.bincount(row, minlength=tied.numel())
    rank = torch.arange(row.numel(), device=row.device) - (torch.cumsum(counts, 0) - counts)[row]
    slot = n_above[row] + rank
    keep = slot < k_local
    ids[tied[row[keep]], slot[keep]] = where[keep, 1]  # their values are the threshold already


def truncate_vocab_parallel(
    teacher_logits_Nv: torch.Tensor,
    vocab: VocabInfo,
    spec: TruncationSpec,
    tp_group,
    chunk_tokens: int | None = None,
) -> SparseTeacher:
    """Top-p-k of logits sharded over ``tp_group`` (collective: one all-gather).

    ``chunk_tokens`` rows are read at a time (default: about 2^26 fp32 elements, 256 MB, per
    temporary).

    Returns the same SparseTeacher on every rank of the group, with ``log_tail``. The
    merge runs in float64 on the gathered candidates: log-probs as (x - max) - log1p(S)
    with S the mass below the maximum summed directly, so a confident teacher's top entry
    is -r rather than 0, and log r is exact (not 1 - kept mass).
    """
    valid = vocab.valid_in_shard
    chunk = chunk_tokens or max(1, 2**26 // max(valid, 1))

    def block(start: int, end: int) -> torch.Tensor:
        return teacher_logits_Nv[start:end, :valid]

    num_tokens = teacher_logits_Nv.shape[0]
    return _truncate_blocks(num_tokens, block, chunk, vocab, spec, tp_group, teacher_logits_Nv)


def truncate_hidden_vocab_parallel(
    hidden_NH: torch.Tensor,
    weight_vH: torch.Tensor,
    vocab: VocabInfo,
    spec: TruncationSpec,
    tp_group,
    chunk_tokens: int | None = None,
) -> SparseTeacher:
    """Top-p-k straight from a model's final hidden states [N, H] and this rank's vocab shard
    of its output weight [v, H]: the logits h W^T are made ``chunk_tokens`` rows at a time
    (default: the fused output layer's chunks, loss/fused_linear.default_fused_chunk: its
    GEMM packs the whole weight shard per chunk, so rows come in hundreds) and never exist
    whole. The same entries as
    ``truncate_vocab_parallel`` of the full logits (each row's logits are the same GEMM
    row); collective: one all-gather over ``tp_group``."""
    valid = vocab.valid_in_shard
    if hidden_NH.shape[-1] != weight_vH.shape[-1] or weight_vH.shape[0] < valid:
        raise ValueError(
            f"hidden states {tuple(hidden_NH.shape)} and output weight "
            f"{tuple(weight_vH.shape)} do not fit a vocab shard of {valid} columns"
        )
    chunk = chunk_tokens or default_fused_chunk(weight_vH.shape[0], hidden_NH.device.type)
    rows = min(chunk, hidden_NH.shape[0])
    buffer = torch.empty(rows, weight_vH.shape[0], dtype=hidden_NH.dtype, device=hidden_NH.device)
    scratch = torch.empty_like(buffer) if transposed_gemms(hidden_NH.device) else None

    def block(start: int, end: int) -> torch.Tensor:
        # the output layer's own product (all padded rows included), then the valid columns
        out = chunk_logits(hidden_NH[start:end], weight_vH, buffer[: end - start], scratch)
        return out[:, :valid]

    return _truncate_blocks(hidden_NH.shape[0], block, chunk, vocab, spec, tp_group, hidden_NH)


def _truncate_blocks(num_tokens, block, chunk, vocab, spec, tp_group, like) -> SparseTeacher:
    """Local candidates of the row blocks ``block(start, end)`` [C, v], one all-gather, the
    exact float64 merge and the top-p-k cut (see truncate_vocab_parallel)."""
    valid = vocab.valid_in_shard
    slots = spec.slots
    k_local = min(slots, valid)
    width = 2 * slots + 2
    rows = torch.empty(num_tokens, width, device=like.device)
    rows[:, :slots] = -math.inf
    rows[:, slots : 2 * slots] = -1.0  # candidate ids (as floats, exact below 2^24)
    rows[:, -2] = NEG
    rows[:, -1] = 0.0
    for start in range(0, num_tokens if valid else 0, chunk):
        end = min(start + chunk, num_tokens)
        values, local_ids, rest_max, rest_sum = _local_candidates(
            block(start, end).float(), k_local
        )
        if torch.isnan(values[:, 0]).any():  # topk ranks NaN first: one cheap check
            row = start + int(torch.isnan(values[:, 0]).nonzero()[0, 0])
            raise ValueError(f"teacher logits are NaN at token row {row} (tp rank {vocab.tp_rank})")
        rows[start:end, :k_local] = values
        rows[start:end, slots : slots + k_local] = (local_ids + vocab.shard_start).float()
        rows[start:end, -2] = rest_max
        rows[start:end, -1] = rest_sum
    gathered = all_gather_stacked(rows, tp_group).double()  # [R, N, width]
    values = gathered[..., :slots].permute(1, 0, 2).reshape(num_tokens, -1)
    ids = gathered[..., slots : 2 * slots].permute(1, 0, 2).reshape(num_tokens, -1).long()
    values, ids = order_entries(values, ids)
    _check_some_mass(values[:, 0])
    top = values[:, :1].clamp_min(NEG)
    # log of each rank's rest mass relative to the maximum (-inf for an empty rest)
    rest = gathered[..., -2].t() - top + gathered[..., -1].t().log()
    below_max = torch.cat([values[:, 1:] - top, rest], dim=1).exp().sum(-1, keepdim=True)
    log_z = torch.log1p(below_max)  # log sum exp(x - max), the maximum's own term exact
    logp = values - top - log_z
    log_rest = torch.logsumexp(rest, dim=-1) - log_z[:, 0]
    return _cut(ids, logp, log_rest, spec)


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

    Exact for exact log-probs (ties by lowest id, as everywhere); with a store's quantized
    values the prefix boundary can move where the cumulative mass is within the quantization
    error of p. The dropped entries join the tail: log_tail = log(r + their mass).
    """
    from megatron_pd.loss.spec import tail_log_mass

    values, ids = order_entries(teacher.logprobs.double(), teacher.indices.long())
    values = torch.where(ids >= 0, values, torch.full_like(values, -math.inf))
    return _cut(ids, values, tail_log_mass(teacher), spec)


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
