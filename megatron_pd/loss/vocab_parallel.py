"""The fused vocab-parallel distillation loss (pure torch): (1 - alpha) * CE + alpha * KD.

Each tensor-parallel rank holds its vocabulary shard of the student logits [N, v] (and of a
dense teacher's, or all of a sparse teacher's kept entries). Forward, in token chunks so that
no [N, v] fp32 temporary ever exists:

  1. one read of the logits: local per-token statistics relative to local maxima (stats.py)
  2. ONE collective: all-gather of those [N, c] rows over ``tp_group``; every rank merges them
     exactly (rescaling to the global maxima) into the per-token losses
  3. JSD only: a second read and ONE SUM all-reduce of [N, 2] for the log-mixture terms

Only per-token scalars are saved (the logits themselves are kept by reference). Backward
recomputes softmax probabilities chunk by chunk from the saved normalisers and writes the
gradient in the logits' dtype; it needs no communication. The hard-label CE shares step 1
(its target logit and tau = 1 normaliser ride in the same gathered rows).

Shape legend: N tokens, v valid columns of this rank's shard (padding excluded), V padded
vocab, K kept entries of a sparse teacher, C tokens of a chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_pd.loss import compiled_kernels as CK
from megatron_pd.loss import stats as S
from megatron_pd.loss import triton_kernels as TK
from megatron_pd.loss.spec import DenseTeacher, LossSpec, SparseTeacher, sparse_teacher_distribution
from megatron_pd.loss.stats import NEG
from megatron_pd.parallel.collectives import all_gather_stacked, all_reduce_sum
from megatron_pd.parallel.vocab import VocabInfo

# the implementations whose per-row work is a kernel module (the same three functions:
# row_stats, jsd_sums, grad_rows); "torch" runs stats.py's passes chunk by chunk
ROW_KERNELS = {"triton": TK, "compiled": CK}


def default_chunk_tokens(shard_width: int, tp_size: int = 1) -> int:
    """Tokens per chunk: rows of the *full* vocabulary in 4 MB of fp32 (so each rank's [C, v]
    workspace buffers shrink with TP like its logits do), but at least 1 MB per buffer.

    About five such buffers live at once: the loss's temporaries stay near 20 MB at TP=1
    whatever the number of tokens, and one op on 0.25-1M elements dwarfs the per-chunk Python
    overhead.
    """
    width = max(shard_width, 1)
    return max(1, 2**20 // (width * tp_size), 2**18 // width)


def _sparse_prep(teacher: SparseTeacher, spec: LossSpec, vocab: VocabInfo) -> dict:
    """Per-token teacher quantities of a sparse teacher (no communication: all ranks hold all
    kept entries) and this shard's view of the entries."""
    T, r, log_r = sparse_teacher_distribution(teacher, spec.tau, spec.tail)
    valid = teacher.valid
    # log T in the log domain: T itself underflows in fp32 for entries below e^-87
    scaled = torch.where(valid, teacher.logprobs.float() / spec.tau, torch.full_like(T, -math.inf))
    log_q = scaled - torch.logsumexp(scaled, -1, keepdim=True).clamp_min(NEG)
    log_T = log_q + (torch.log1p(-r)[:, None] if spec.tail else 0.0)
    log_T = torch.where(valid, log_T, torch.zeros_like(log_T))
    local = teacher.indices.long() - vocab.shard_start
    owned = valid & (local >= 0) & (local < vocab.valid_in_shard)
    local = local.clamp(0, max(vocab.valid_in_shard - 1, 0))
    sum_TlogT = (T * log_T).sum(-1)
    r_log_r = torch.where(r > 0, r * log_r, torch.zeros_like(r))
    entropy = -sum_TlogT - r_log_r if spec.tail else -sum_TlogT
    # T is zero in empty slots and ordered like the log-probs: its argmax is the best entry
    best = T.argmax(-1, keepdim=True)
    return {
        "T": T,
        "log_T": log_T,
        "r": r,
        "log_r": log_r,
        "local": local,
        "owned": owned,
        "has_entries": valid.any(-1),
        "teacher_entropy": entropy,
        "best": best,  # [N, 1] the slot of the teacher's most probable kept entry
        "sum_TlogT": sum_TlogT,
        "sum_TT": (T * T).sum(-1) if spec.kind == "mse_probs" else None,
        "kept": valid.sum(-1).float(),
    }


def _chunks(num_tokens: int, chunk: int):
    for start in range(0, num_tokens, chunk):
        yield start, min(start + chunk, num_tokens)


@dataclass
class LossForward:
    """What the forward of the fused loss computed, per token [N], and what its gradient needs."""

    loss: torch.Tensor
    lm: torch.Tensor
    kd: torch.Tensor
    aux: dict  # teacher_entropy, agree, kept (None where not computed)
    per_token: dict  # lse_s, lse_t, lse_1, W, a: the scalars of the gradient
    ignored: torch.Tensor  # [N] bool: label is ignore_index
    keep_kd: torch.Tensor  # [N] bool: the KD term counts
    alpha: float
    kind: str | None  # "dense", "sparse" or None (alpha = 0)


def loss_forward(
    student_Nv,
    labels_N,
    teacher_dense_Nv,
    sparse: dict | None,
    spec: LossSpec,
    vocab: VocabInfo,
    tp_group,
    chunk_tokens: int,
    stats_log: list,
    metrics: bool,
    impl: str,
    ws=None,
) -> LossForward:
    """Per-token losses of vocab-sharded logits (collective: one all-gather, JSD one more).

    ``sparse`` is ``_sparse_prep`` of a sparse teacher (None for dense or no teacher); ``ws``
    a stats.Workspace to reuse (a caller looping over chunks keeps one for all of them).
    """
    num_tokens = student_Nv.shape[0]
    valid = vocab.valid_in_shard
    kind = "dense" if teacher_dense_Nv is not None else ("sparse" if sparse else None)
    with_labels = labels_N is not None
    names = S.needed_stats(spec, kind, with_labels, metrics)
    labels_local = (labels_N - vocab.shard_start) if with_labels else None
    device = student_Nv.device

    tau_s = spec.tau_student if kind else 1.0
    teacher_valid = teacher_dense_Nv[:, :valid] if kind == "dense" else None
    # 1. local statistics, one read of the logits
    kernels = ROW_KERNELS.get(impl)
    if kernels is not None:
        local = kernels.row_stats(
            student_Nv[:, :valid],
            teacher_valid,
            labels_local,
            names,
            spec,
            tau_s,
            vocab.shard_start,
        )
        if sparse is not None and valid > 0:
            shifted = student_Nv[:, :valid].gather(1, sparse["local"]).float() / tau_s
            shifted = shifted - local[:, :1]
            kept = S.sparse_kept_stats(shifted, _gathered_view(sparse), names)
            for name, value in kept.items():
                local[:, 2 + names.index(name)] = value
            if "z_out" in names:  # the kernels do not sum outside the kept set
                column = 2 + names.index("z_out")
                for start, end in _chunks(num_tokens, chunk_tokens):
                    rows = student_Nv[start:end, :valid].float() / tau_s
                    exp = (rows - local[start:end, :1]).exp_()
                    part = _slice_sparse(sparse, start, end)
                    local[start:end, column] = S.outside_exp_sum(exp, part)
    else:
        local = torch.empty(num_tokens, 2 + len(names), device=device)
        ws = ws or S.Workspace(min(chunk_tokens, num_tokens), valid, device)
        for start, end in _chunks(num_tokens, chunk_tokens):
            local[start:end] = S.chunk_local_stats(
                student_Nv[start:end, :valid],
                teacher_valid[start:end] if kind == "dense" else None,
                _slice_sparse(sparse, start, end),
                labels_local[start:end] if with_labels else None,
                spec,
                names,
                vocab.shard_start,
                ws,
            )
    # 2. one all-gather of the per-token rows; exact merge on every rank
    gathered = all_gather_stacked(local, tp_group)
    stats_log.append("all_gather")
    merged = S.merge_stats(gathered, names, tau_s)
    values = S.finalize(merged, spec, kind, sparse, vocab.true_size)

    # 3. JSD: second read for the log-mixture terms, one SUM all-reduce
    if S.has_second_pass(spec, kind):
        if kernels is not None and kind == "dense":
            sums = kernels.jsd_sums(
                student_Nv[:, :valid],
                teacher_valid,
                values["lse_s"],
                values["lse_t"],
                spec,
                tau_s,
            )
        else:
            sums = torch.zeros(num_tokens, 2, device=device)
            for start, end in _chunks(num_tokens, chunk_tokens):
                sums[start:end] = _jsd_chunk_sums(
                    student_Nv[start:end, :valid],
                    teacher_valid[start:end] if kind == "dense" else None,
                    _slice_sparse(sparse, start, end),
                    values,
                    start,
                    end,
                    spec,
                    tau_s,
                )
        all_reduce_sum(sums, tp_group)
        stats_log.append("all_reduce")
        kd, W = sums[:, 0], sums[:, 1]
        if kind == "sparse":
            outside_value, outside_weighted, a = S.jsd_outside_terms(spec, values["G"], sparse["r"])
            kd, W = kd + outside_value, W + outside_weighted
            values["a"] = a
        values["kd"] = kd * spec.kd_scale
        values["W"] = W

    zero = torch.zeros(num_tokens, device=device)
    ignored = (
        (labels_N == spec.ignore_index) if with_labels else torch.zeros_like(zero, dtype=torch.bool)
    )
    keep_kd = ~ignored
    if kind == "sparse":
        keep_kd = keep_kd & sparse["has_entries"]
    lm = torch.where(ignored, zero, values.get("lm", zero))
    kd = torch.where(keep_kd, values.get("kd", zero), zero)
    alpha = spec.alpha if kind else 0.0
    loss = (1.0 - alpha) * lm + alpha * kd

    aux = {
        "teacher_entropy": values.get("teacher_entropy"),
        "agree": values.get("agree"),
        "kept": sparse["kept"] if sparse else None,
    }
    per_token = {
        k: values[k] for k in ("lse_s", "lse_t", "lse_1", "W", "a") if values.get(k) is not None
    }
    return LossForward(loss, lm, kd, aux, per_token, ignored, keep_kd, alpha, kind)


def loss_grad(
    grad_Nv,
    student_Nv,
    labels_N,
    teacher_Nv,
    sparse: dict | None,
    fwd: LossForward,
    ce_weight,
    kd_weight,
    spec: LossSpec,
    vocab: VocabInfo,
    chunk_tokens: int,
    impl: str,
    ws=None,
    from_forward: bool = False,
) -> None:
    """Write d(sum_t ce_weight_t CE_t + kd_weight_t KD_t) / d logits into ``grad_Nv`` (the
    logits' dtype; padded columns 0). ``ce_weight``/``kd_weight`` [N] already include alpha,
    tau^2 and the ignored/no-entry masks, not 1 / tau_s. No communication.

    ``from_forward``: ``ws`` still holds what loss_forward's statistics left for these very
    tokens (one chunk; Workspace.fresh): the softmaxes are then rescaled from its exponentials
    (one multiply instead of a subtract and an exp) and the scaled logits are not remade."""
    per_token, kind = fwd.per_token, fwd.kind
    valid = vocab.valid_in_shard
    grad_Nv[:, valid:] = 0.0  # padded vocabulary columns
    if kind:
        kd_weight = kd_weight / spec.tau_student
    with_labels = labels_N is not None
    labels_local = labels_N - vocab.shard_start if with_labels else None
    kernels = ROW_KERNELS.get(impl)
    if kernels is not None:
        kernels.grad_rows(
            student_Nv[:, :valid],
            teacher_Nv[:, :valid] if kind == "dense" else None,
            labels_local,
            per_token,
            ce_weight,
            kd_weight,
            spec,
            kind,
            grad_Nv[:, :valid],
            vocab.true_size,
        )
        if kind == "sparse" and valid > 0:
            # The kernel wrote the generic derivative everywhere; the kept columns get
            # theirs: KD, plus the hard-label CE the kernel had put there.
            sparse = _gathered_view(sparse)
            logits_kept = student_Nv[:, :valid].gather(1, sparse["local"]).float()
            P_kept = (logits_kept / spec.tau_student - per_token["lse_s"][:, None]).exp()
            kept = _kept_grad(P_kept, sparse, per_token, kd_weight[:, None], spec)
            if labels_local is not None:
                lse_1 = per_token.get("lse_1", per_token["lse_s"])
                P1_kept = (logits_kept - lse_1[:, None]).exp()
                is_label = sparse["local"] == labels_local[:, None]
                ce = ce_weight[:, None] * (P1_kept - is_label.to(P1_kept.dtype))
                kept = kept + torch.where(sparse["owned"], ce, torch.zeros_like(ce))
            _overwrite_kept(grad_Nv[:, :valid], sparse, kept)
        return
    direct = grad_Nv.dtype == torch.float32  # compute straight into the gradient
    rows_needed = min(chunk_tokens, max(student_Nv.shape[0], 1))
    if from_forward and (ws is None or student_Nv.shape[0] > chunk_tokens):
        raise ValueError("loss_grad(from_forward=True) needs the forward's workspace, one chunk")
    ws = ws or S.Workspace(rows_needed, valid, student_Nv.device)
    fresh = ws.fresh if from_forward else {}
    for start, end in _chunks(student_Nv.shape[0], chunk_tokens):
        if valid == 0:
            break
        rows = slice(start, end)
        target = grad_Nv[rows, :valid] if direct else ws.get("grad", end - start)
        _grad_chunk(
            student_Nv[rows, :valid],
            labels_local[rows] if with_labels else None,
            teacher_Nv[rows, :valid] if kind == "dense" else None,
            _slice_sparse(sparse, start, end),
            {k: v[rows] for k, v in per_token.items()},
            ce_weight[rows],
            kd_weight[rows],
            spec,
            kind,
            vocab.true_size,
            ws,
            target,
            fresh,
        )
        if not direct:
            grad_Nv[rows, :valid] = target


def grad_weights(fwd: LossForward, spec: LossSpec, upstream_N) -> tuple:
    """(ce_weight, kd_weight) [N] of the gradient for upstream per-token gradients."""
    ce_weight = ((1.0 - fwd.alpha) * upstream_N).masked_fill(fwd.ignored, 0.0)
    kd_weight = (fwd.alpha * spec.kd_scale * upstream_N).masked_fill(~fwd.keep_kd, 0.0)
    return ce_weight, kd_weight


class FusedDistillLossFunction(torch.autograd.Function):
    """Per-token (1 - alpha) * CE + alpha * KD over vocab-sharded logits. See module doc."""

    @staticmethod
    def forward(
        ctx,
        student_Nv,
        labels_N,
        teacher_dense_Nv,
        teacher_idx_NK,
        teacher_logp_NK,
        teacher_log_tail_N,
        spec: LossSpec,
        vocab: VocabInfo,
        tp_group,
        chunk_tokens: int,
        stats_log: list,
        metrics: bool = True,
        impl: str = "torch",
    ):
        sparse = None
        if teacher_idx_NK is not None:
            teacher = SparseTeacher(teacher_idx_NK, teacher_logp_NK, teacher_log_tail_N)
            sparse = _sparse_prep(teacher, spec, vocab)
        fwd = loss_forward(
            student_Nv,
            labels_N,
            teacher_dense_Nv,
            sparse,
            spec,
            vocab,
            tp_group,
            chunk_tokens,
            stats_log,
            metrics,
            impl,
        )
        ctx.spec, ctx.vocab, ctx.chunk, ctx.impl = spec, vocab, chunk_tokens, impl
        ctx.fwd, ctx.sparse = fwd, sparse
        ctx.save_for_backward(student_Nv, labels_N, teacher_dense_Nv)
        zero = torch.zeros_like(fwd.loss)
        outputs = [fwd.loss, fwd.lm.detach(), fwd.kd.detach()]
        for name in ("teacher_entropy", "agree", "kept"):
            value = fwd.aux[name]
            outputs.append(value.float() if value is not None else zero)
        for tensor in outputs[1:]:
            ctx.mark_non_differentiable(tensor)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        student_Nv, labels_N, teacher_Nv = ctx.saved_tensors
        grad = torch.empty_like(student_Nv)
        ce_weight, kd_weight = grad_weights(ctx.fwd, ctx.spec, grad_loss)
        loss_grad(
            grad,
            student_Nv,
            labels_N,
            teacher_Nv,
            ctx.sparse,
            ctx.fwd,
            ce_weight,
            kd_weight,
            ctx.spec,
            ctx.vocab,
            ctx.chunk,
            ctx.impl,
        )
        return (grad,) + (None,) * 13


_PER_ENTRY = ("T", "log_T", "local", "owned", "r", "best")  # what the chunk loops slice


def _gathered_view(sparse: dict) -> dict:
    return {k: sparse[k] for k in _PER_ENTRY}


def _slice_sparse(sparse: dict | None, start: int, end: int) -> dict | None:
    if sparse is None:
        return None
    return {k: sparse[k][start:end] for k in _PER_ENTRY}


def _jsd_chunk_sums(student_Cv, teacher_Cv, sparse, values, start, end, spec, tau_s):
    lse_s = values["lse_s"][start:end, None]
    s = student_Cv.float() / tau_s
    if teacher_Cv is not None:
        P = (s - lse_s).exp()
        T = (teacher_Cv.float() / spec.tau - values["lse_t"][start:end, None]).exp()
        value, weighted = S.jsd_terms(P, T, spec.jsd_beta)
        return torch.stack([value.sum(-1), weighted.sum(-1)], dim=-1)
    if s.shape[1] == 0:
        return torch.zeros(s.shape[0], 2, device=s.device)
    P = (s.gather(1, sparse["local"]) - lse_s).exp()
    owned = sparse["owned"]
    P = torch.where(owned, P, torch.zeros_like(P))
    T = torch.where(owned, sparse["T"], torch.zeros_like(P))
    value, weighted = S.jsd_terms(P, T, spec.jsd_beta)
    return torch.stack([value.sum(-1), weighted.sum(-1)], dim=-1)


def _grad_chunk(
    student_Cv,
    labels_local,
    teacher_Cv,
    sparse,
    per_token,
    ce_weight,
    kd_weight,
    spec,
    kind,
    true_vocab,
    ws,
    out,
    fresh: dict,
):
    """Write d loss / d student logits of one chunk into ``out`` (fp32 [C, v]).

    In-place ops on workspace buffers, few passes. ``ce_weight``/``kd_weight`` [C] already
    hold the upstream gradient, alpha, tau^2 and 1/tau_s. ``fresh``: what the forward left in
    ``ws`` for this chunk (Workspace.fresh; empty: nothing is reused).
    """
    num = student_Cv.shape[0]
    tau_s = spec.tau_student if kind else 1.0
    s = _scaled(student_Cv, 1.0 / tau_s, ws, "s", num, fresh)
    lse_s = per_token["lse_s"][:, None]
    # The hard-label softmax equals P when tau_s = 1; otherwise it is recomputed at tau = 1.
    shared_ce = labels_local is not None and tau_s == 1.0
    # The CE's softmax is always exp(s - lse), never rescaled from the forward's exponentials:
    # then alpha = 0 reproduces LM-only training bit for bit, at every tau
    P = _softmax(s, lse_s, out, ws, "exp_s", num, {} if shared_ce else fresh)
    width = s.shape[1]
    ce_col = ce_weight[:, None]
    kd_col = kd_weight[:, None]
    if kind is None:
        grad = P.mul_(ce_col)
    elif kind == "dense":
        grad = _dense_kd_grad(
            s,
            P,
            teacher_Cv,
            per_token,
            kd_col,
            ce_col if shared_ce else None,
            spec,
            true_vocab,
            ws,
            fresh,
        )
    else:
        grad = _sparse_kd_grad(P, sparse, per_token, kd_col, ce_col if shared_ce else None, spec)
    if labels_local is not None:
        if not shared_ce and kind is not None:
            raw = S.as_fp32_scaled(student_Cv, 1.0, ws.get("t", num))
            P1 = torch.sub(raw, per_token["lse_1"][:, None], out=ws.get("tmp", num)).exp_()
            grad.addcmul_(P1, ce_col)
        owned = (labels_local >= 0) & (labels_local < width)
        rows = torch.arange(grad.shape[0], device=grad.device)[owned]
        grad[rows, labels_local[owned]] -= ce_weight[owned]
    return grad


def _scaled(x_Cv, inv_tau, ws, name, num, fresh):
    """x / tau in fp32 (as_fp32_scaled), or the forward's copy in ``ws`` when it is fresh."""
    if name in fresh:
        return ws.get(name, num)
    return S.as_fp32_scaled(x_Cv, inv_tau, ws.get(name, num))


def _softmax(x_Cv, lse_col, out, ws, exp_name, num, fresh):
    """exp(x - lse) into ``out``: from the forward's exp(x - m) when fresh (times exp(m - lse)
    <= 1 per row: one multiply, no exp over the chunk), else subtract and exp."""
    if exp_name in fresh:
        scale = (fresh[exp_name][:, None] - lse_col).exp_()
        return torch.mul(ws.get(exp_name, num), scale, out=out)
    return torch.sub(x_Cv, lse_col, out=out).exp_()


def _dense_kd_grad(s, P, teacher_Cv, per_token, kd_col, ce_col, spec, true_vocab, ws, fresh):
    """kd_weight * dKD/ds~ (+ ce_weight * P when the CE softmax is shared), dense teacher.

    Returns the gradient in P's buffer (P is consumed).
    """
    kd = spec.kind
    num = s.shape[0]
    needs_t = kd in ("mse_logits", "reverse_kl") or "exp_t" not in fresh
    t = _scaled(teacher_Cv, 1.0 / spec.tau, ws, "t", num, fresh) if needs_t else None
    if kd == "mse_logits":
        P.mul_(ce_col) if ce_col is not None else P.zero_()
        return P.add_(torch.sub(s, t, out=ws.get("tmp", num)).mul_(kd_col * (2.0 / true_vocab)))
    T = _softmax(t, per_token["lse_t"][:, None], ws.get("tmp", num), ws, "exp_t", num, fresh)
    if kd in ("soft_ce", "forward_kl"):  # P - T
        grad = P.mul_(kd_col if ce_col is None else kd_col + ce_col)
        return grad.addcmul_(T, kd_col, value=-1.0)
    if kd == "reverse_kl":  # P * (log P - log T - KL)
        shift = per_token["lse_s"] - per_token["lse_t"] + per_token["W"]
        factor = torch.sub(s, t, out=ws.get("factor", num)).sub_(shift[:, None]).mul_(kd_col)
    elif kd == "mse_probs":  # 2 P ((P - T) - (sum P^2 - sum P T))
        factor = torch.sub(P, T, out=ws.get("factor", num))
        factor.sub_(per_token["W"][:, None] / 2.0).mul_(2.0 * kd_col)
    else:  # jsd: P * ((1 - beta) log(P / M) - W)
        beta = spec.jsd_beta
        mix = T.mul_(beta).add_(P, alpha=1.0 - beta).clamp_min_(1e-38).log_()
        factor = torch.clamp_min(P, 1e-38, out=ws.get("factor", num)).log_().sub_(mix)
        factor.mul_(1.0 - beta).sub_(per_token["W"][:, None]).mul_(kd_col)
    if ce_col is not None:
        factor = factor.add_(ce_col)
    return P.mul_(factor)


def _sparse_kd_grad(P, sparse, per_token, kd_col, ce_col, spec):
    """kd_weight * dKD/ds~ (+ ce_weight * P when shared) against kept entries (+ tail)."""
    kd = spec.kind
    W = per_token["W"][:, None]
    P_kept = P.gather(1, sparse["local"])
    # Outside the kept set the derivative is P * (a - W), with a per-token constant a (for
    # mse_probs without tail: a = 2 P, elementwise); the kept columns are then overwritten.
    if kd == "mse_probs" and not spec.tail:
        factor = (2.0 * P - W).mul_(kd_col)
        if ce_col is not None:
            factor.add_(ce_col)
        grad = P.mul_(factor)
    elif spec.tail:
        # P * (a - W) first: a = -r / G is huge where the student leaves almost nothing
        # outside, and (a - W) * kd_weight alone could overflow (fp16 loss scales) while the
        # product with P (<= G) stays below r * kd_weight
        shared = P.clone() if ce_col is not None else None
        grad = P.mul_(per_token["a"][:, None] - W).mul_(kd_col)
        if shared is not None:
            grad.add_(shared.mul_(ce_col))
    else:
        coefficient = (per_token["a"][:, None] - W) * kd_col
        grad = P.mul_(coefficient if ce_col is None else coefficient + ce_col)
    kept = _kept_grad(P_kept, sparse, per_token, kd_col, spec)
    if ce_col is not None:
        kept = kept + torch.where(sparse["owned"], P_kept * ce_col, torch.zeros_like(kept))
    return _overwrite_kept(grad, sparse, kept)


def _kept_grad(P_kept, sparse, per_token, kd_col, spec):
    """kd_weight * dKD/ds~ at the kept entries [C, K] (0 in slots another shard owns)."""
    kd, W, T = spec.kind, per_token["W"][:, None], sparse["T"]
    if kd in ("soft_ce", "forward_kl"):
        kept_grad = P_kept - T
    elif kd == "reverse_kl":
        kept_grad = P_kept * (S._log(P_kept) - sparse["log_T"] - W)
    elif kd == "mse_probs":
        kept_grad = P_kept * (2.0 * (P_kept - T) - W)
    else:  # jsd
        mix = spec.jsd_beta * T + (1 - spec.jsd_beta) * P_kept
        kept_grad = P_kept * ((1 - spec.jsd_beta) * (S._log(P_kept) - S._log(mix)) - W)
    return torch.where(sparse["owned"], kept_grad * kd_col, torch.zeros_like(T))


def _overwrite_kept(grad, sparse, values):
    """Set ``grad`` at this shard's kept columns to ``values`` [C, K], in place.

    Overwritten, not corrected by adding (kept - generic): with a tail the generic outside
    coefficient -r / G is huge when the student leaves almost no mass outside the kept set,
    and adding then subtracting it at a kept column would cancel catastrophically. Only owned
    slots are written (an empty or foreign slot's column is clamped onto some real column);
    kept ids are unique per token, so a plain indexed assignment is exact.
    """
    owned = sparse["owned"]
    rows = torch.arange(grad.shape[0], device=grad.device)[:, None].expand_as(owned)[owned]
    grad[rows, sparse["local"][owned]] = values[owned].to(grad.dtype)
    return grad


def fused_distill_loss(
    student_logits_Nv: torch.Tensor,
    labels_N: torch.Tensor | None,
    teacher,
    spec: LossSpec,
    vocab: VocabInfo,
    tp_group,
    chunk_tokens: int | None = None,
    collectives: list | None = None,
    metrics: bool = True,
    impl: str = "torch",
) -> dict:
    """Per-token {"loss" (differentiable), "lm", "kd", "teacher_entropy", "agree", "kept"}.

    Collective over ``tp_group`` (one all-gather; JSD adds one all-reduce). ``collectives``,
    if given, receives the name of each collective issued (tests count them). With
    ``metrics=False`` the teacher entropy and top-1 agreement (two extra reductions over the
    vocabulary) are not computed and come back as zeros.
    """
    spec.check_teacher(teacher)
    chunk = chunk_tokens or default_chunk_tokens(vocab.shard_size, vocab.tp_size)
    dense = teacher.logits if isinstance(teacher, DenseTeacher) else None
    idx = teacher.indices if isinstance(teacher, SparseTeacher) else None
    logp = teacher.logprobs if isinstance(teacher, SparseTeacher) else None
    log_tail = teacher.log_tail if isinstance(teacher, SparseTeacher) else None
    log = collectives if collectives is not None else []
    if impl not in ("torch", "triton", "compiled"):
        raise ValueError(f"fused loss implementation {impl!r}: must be torch, triton or compiled")
    if impl == "triton":
        usable, why = TK.triton_available()
        if not usable:
            raise RuntimeError(f"loss implementation 'triton' cannot run here: {why}")
    if impl == "compiled":
        CK.check_available(student_logits_Nv.device)
    loss, lm, kd, entropy, agree, kept = FusedDistillLossFunction.apply(
        student_logits_Nv,
        labels_N,
        dense,
        idx,
        logp,
        log_tail,
        spec,
        vocab,
        tp_group,
        chunk,
        log,
        metrics,
        impl,
    )
    return {
        "loss": loss,
        "lm": lm,
        "kd": kd,
        "teacher_entropy": entropy,
        "agree": agree,
        "kept": kept,
    }
