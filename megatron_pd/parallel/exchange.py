"""Teacher outputs to student ranks when teacher and student use different parallel layouts.

Every rank holds a shard of the teacher and a shard of the student (co-located). The ranks of
one teacher model-parallel replica (its tp x pp ranks) may belong to several student
data-parallel ranks, each with its own micro-batch. Per micro-batch:

1. ``gather_union_tokens``: the replica all-gathers its members' token micro-batches and
   keeps one copy per student DP index: the union U (``union_dp`` order).
2. The teacher runs once on U; its last pipeline stage holds [|U|*B, S, V_t/tp_t] logits
   (and, with truncation, the same kept entries on every teacher tp rank).
3. ``exchange_dense`` / ``exchange_sparse`` / ``exchange_hidden`` send every student loss
   rank (student last stage) exactly its own B samples, in the *student's* vocab layout: for
   dense, the overlap of each teacher vocab shard with the student's shard (true vocabulary
   only); for sparse, the kept entries from one teacher tp rank; for hidden, the teacher's
   final hidden states [B, S, H_t] from one teacher tp rank - the loss rank then makes the
   teacher's logits itself from the rows of the teacher's output weight for its own vocab
   shard, which ``exchange_weight_rows`` moved once, at start (the same column arithmetic as
   dense, applied to weight rows). Point-to-point (batched isend/irecv); a transfer to
   oneself is a local copy.

``ExchangePlan`` is pure layout arithmetic (no communication), so it is tested for any world
size; the same-layout case degenerates to local copies of identical vocab shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_pd.parallel.topology import Layout


@dataclass(frozen=True)
class Transfer:
    """One piece of one student rank's teacher payload."""

    src: int
    dst: int
    dp_index: int  # the student DP index whose samples move
    union_slot: int  # position of those samples in the source replica's union batch
    src_cols: tuple | None  # (start, end) columns of the teacher shard (dense only)
    dst_cols: tuple | None  # (start, end) columns of the student shard (dense only)


class ExchangePlan:
    """Who sends what to whom, from the two layouts and vocabulary sizes."""

    def __init__(
        self,
        world_size: int,
        student: Layout,
        teacher: Layout,
        true_vocab: int,
        student_padded: int,
        teacher_padded: int,
        mode: str,
    ):
        if mode not in ("dense", "sparse", "hidden"):
            raise ValueError(f"exchange mode {mode!r}: must be dense, sparse or hidden")
        self.world_size, self.student, self.teacher, self.mode = world_size, student, teacher, mode
        self.true_vocab = true_vocab
        self.student_shard = student_padded // student.tp
        self.teacher_shard = teacher_padded // teacher.tp
        self.transfers = [t for r in range(world_size) for t in self._receives(r, mode)]
        # hidden mode: the teacher output weight's rows, moved once like dense columns
        self.row_transfers = (
            [t for r in range(world_size) for t in self._receives(r, "dense")]
            if mode == "hidden"
            else []
        )

    def replica(self, rank: int) -> list:
        """Ranks of ``rank``'s teacher model-parallel replica."""
        e = self.teacher.coords(rank)["dp"]
        return [r for r in range(self.world_size) if self.teacher.coords(r)["dp"] == e]

    def union_dp(self, rank: int) -> list:
        """Student DP indices whose micro-batches form ``rank``'s replica union, in order."""
        return sorted({self.student.coords(r)["dp"] for r in self.replica(rank)})

    def is_loss_rank(self, rank: int) -> bool:
        return self.student.coords(rank)["pp"] == self.student.pp - 1

    def is_teacher_output_rank(self, rank: int) -> bool:
        return self.teacher.coords(rank)["pp"] == self.teacher.pp - 1

    def _receives(self, rank: int, mode: str) -> list:
        if not self.is_loss_rank(rank):
            return []
        coords = self.student.coords(rank)
        d, j = coords["dp"], coords["tp"]
        e = self.teacher.coords(rank)["dp"]
        slot = self.union_dp(rank).index(d)
        last = self.teacher.pp - 1
        if mode in ("sparse", "hidden"):  # every teacher tp rank holds the whole payload
            src = self.teacher.rank(j % self.teacher.tp, e, last)
            return [Transfer(src, rank, d, slot, None, None)]
        transfers = []
        lo_s, hi_s = j * self.student_shard, min((j + 1) * self.student_shard, self.true_vocab)
        for i in range(self.teacher.tp):
            lo_t, hi_t = i * self.teacher_shard, (i + 1) * self.teacher_shard
            lo, hi = max(lo_s, lo_t), min(hi_s, hi_t)
            if lo < hi:
                transfers.append(
                    Transfer(
                        self.teacher.rank(i, e, last),
                        rank,
                        d,
                        slot,
                        (lo - lo_t, hi - lo_t),
                        (lo - lo_s, hi - lo_s),
                    )
                )
        return transfers

    def sends(self, rank: int) -> list:
        return [t for t in self.transfers if t.src == rank]

    def receives(self, rank: int) -> list:
        return [t for t in self.transfers if t.dst == rank]

    def describe(self) -> str:
        moved = [t for t in self.transfers if t.src != t.dst]
        return (
            f"teacher->student exchange ({self.mode}): {len(self.transfers)} transfers per "
            f"micro-batch, {len(moved)} between ranks"
        )


def gather_union_tokens(
    tokens_BS: torch.Tensor, plan: ExchangePlan, rank: int, replica_group
) -> torch.Tensor:
    """[|U| * B, S] tokens of the replica's union batch (collective over ``replica_group``)."""
    from megatron_pd.parallel.collectives import all_gather_stacked

    members = plan.replica(rank)
    gathered = all_gather_stacked(tokens_BS.contiguous(), replica_group)  # [M, B, S]
    first_member = {}
    for position, member in enumerate(members):
        first_member.setdefault(plan.student.coords(member)["dp"], position)
    return torch.cat([gathered[first_member[d]] for d in plan.union_dp(rank)], dim=0)


def _run_p2p(ops: list) -> None:
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


def exchange_dense(
    plan: ExchangePlan,
    rank: int,
    teacher_logits,
    batch: int,
    seq: int,
    dtype,
    device,
    counter: dict | None = None,
):
    """Student loss ranks get [B, S, v_s] teacher logits in the student's vocab layout.

    ``teacher_logits`` [|U| * B, S, v_t] on teacher output ranks (else None). Columns outside
    the true vocabulary stay 0. Collective over the world (point-to-point).
    """
    ops, keep = [], []
    result = None
    if plan.is_loss_rank(rank):
        result = torch.zeros(batch, seq, plan.student_shard, dtype=dtype, device=device)
    for t in plan.sends(rank):
        rows = slice(t.union_slot * batch, (t.union_slot + 1) * batch)
        piece = teacher_logits[rows, :, t.src_cols[0] : t.src_cols[1]].to(dtype).contiguous()
        if t.dst == rank:
            result[..., t.dst_cols[0] : t.dst_cols[1]] = piece
            continue
        keep.append(piece)
        ops.append(dist.P2POp(dist.isend, piece, t.dst))
        _count(counter, piece)
    buffers = []
    for t in plan.receives(rank):
        if t.src == rank:
            continue
        width = t.dst_cols[1] - t.dst_cols[0]
        buffer = torch.empty(batch, seq, width, dtype=dtype, device=device)
        buffers.append((t, buffer))
        ops.append(dist.P2POp(dist.irecv, buffer, t.src))
    _run_p2p(ops)
    for t, buffer in buffers:
        result[..., t.dst_cols[0] : t.dst_cols[1]] = buffer
    return result


def exchange_sparse(
    plan: ExchangePlan,
    rank: int,
    indices,
    logprobs,
    batch: int,
    seq: int,
    slots: int,
    device,
    counter: dict | None = None,
    log_tail=None,
):
    """Student loss ranks get their samples' kept entries: (ids [B, S, K] int32, log-probs
    [B, S, K] fp32, log tail mass [B, S] fp32); other ranks get None. ``indices``/``logprobs``
    [|U| * B, S, K] and ``log_tail`` [|U| * B, S] on teacher output ranks. Collective over
    the world (point-to-point)."""
    ops, keep, result = [], [], None
    for t in plan.sends(rank):
        rows = slice(t.union_slot * batch, (t.union_slot + 1) * batch)
        pieces = (
            indices[rows].to(torch.int32).contiguous(),
            logprobs[rows].float().contiguous(),
            log_tail[rows].float().contiguous(),
        )
        if t.dst == rank:
            result = pieces
            continue
        keep.extend(pieces)
        for piece in pieces:
            ops.append(dist.P2POp(dist.isend, piece, t.dst))
            _count(counter, piece)
    for t in plan.receives(rank):
        if t.src == rank:
            continue
        result = (
            torch.empty(batch, seq, slots, dtype=torch.int32, device=device),
            torch.empty(batch, seq, slots, dtype=torch.float32, device=device),
            torch.empty(batch, seq, dtype=torch.float32, device=device),
        )
        for piece in result:
            ops.append(dist.P2POp(dist.irecv, piece, t.src))
    _run_p2p(ops)
    return result


def exchange_hidden(
    plan: ExchangePlan,
    rank: int,
    hidden,
    batch: int,
    seq: int,
    width: int,
    dtype,
    device,
    counter: dict | None = None,
):
    """Student loss ranks get their samples' teacher hidden states [B, S, H_t] (others None).

    ``hidden`` [|U| * B, S, H_t] on teacher output ranks. Collective over the world (p2p).
    """
    ops, keep, result = [], [], None
    for t in plan.sends(rank):
        rows = slice(t.union_slot * batch, (t.union_slot + 1) * batch)
        piece = hidden[rows].to(dtype).contiguous()
        if t.dst == rank:
            result = piece
            continue
        keep.append(piece)
        ops.append(dist.P2POp(dist.isend, piece, t.dst))
        _count(counter, piece)
    for t in plan.receives(rank):
        if t.src != rank:
            result = torch.empty(batch, seq, width, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, result, t.src))
    _run_p2p(ops)
    return result


def exchange_weight_rows(plan: ExchangePlan, rank: int, weight_vH, width: int, dtype, device):
    """Student loss ranks get the rows of the teacher's output weight for their student vocab
    shard: [v_s, H_t], zero past the true vocabulary (others None).

    ``weight_vH`` is the teacher output rank's own vocab shard [v_t, H_t]. Collective over
    the world (p2p); done once, when the hidden-state exchange is set up.
    """
    ops, keep, result = [], [], None
    if plan.is_loss_rank(rank):
        result = torch.zeros(plan.student_shard, width, dtype=dtype, device=device)
    for t in [t for t in plan.row_transfers if t.src == rank]:
        piece = weight_vH[t.src_cols[0] : t.src_cols[1]].to(dtype).contiguous()
        if t.dst == rank:
            result[t.dst_cols[0] : t.dst_cols[1]] = piece
            continue
        keep.append(piece)
        ops.append(dist.P2POp(dist.isend, piece, t.dst))
    buffers = []
    for t in [t for t in plan.row_transfers if t.dst == rank and t.src != rank]:
        buffer = torch.empty(t.dst_cols[1] - t.dst_cols[0], width, dtype=dtype, device=device)
        buffers.append((t, buffer))
        ops.append(dist.P2POp(dist.irecv, buffer, t.src))
    _run_p2p(ops)
    for t, buffer in buffers:
        result[t.dst_cols[0] : t.dst_cols[1]] = buffer
    return result


def _count(counter, tensor) -> None:
    if counter is not None:
        counter["bytes"] = counter.get("bytes", 0) + tensor.numel() * tensor.element_size()
