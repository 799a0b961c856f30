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

import torch

from megatron_pd.loss import stats as S
from megatron_pd.loss.spec import DenseTeacher, LossSpec, SparseTeacher, sparse_teacher_distribution
from megatron_pd.models.gpt import VocabInfo
from megatron_pd.parallel.collectives import all_gather_stacked, all_reduce_sum

# fp32 bytes of [C, v] temporaries alive at once in a chunk (student, teacher, exp, products).
_TEMPORARIES = 6


def default_chunk_tokens(shard_width: int, budget_bytes: int = 64 * 2**20) -> int:
    """Tokens per chunk so the chunk's fp32 temporaries stay within ``budget_bytes``."""
    return max(1, budget_bytes // (max(shard_width, 1) * 4 * _TEMPORARIES))


def _sparse_prep(teacher: SparseTeacher, spec: LossSpec, vocab: VocabInfo) -> dict:
    """Per-token teacher quantities of a sparse teacher (no communication: all ranks hold all
    kept entries) and this shard's view of the entries."""
    T, r = sparse_teacher_distribution(teacher, spec.tau, spec.tail)
    valid = teacher.valid
    local = teacher.indices.long() - vocab.shard_start
    owned = valid & (local >= 0) & (local < vocab.valid_in_shard)
    local = local.clamp(0, max(vocab.valid_in_shard - 1, 0))
    entropy = -torch.xlogy(T, T).sum(-1)
    if spec.tail:
        entropy = entropy - torch.xlogy(r, r)
    masked = torch.where(valid, teacher.logprobs.float(), torch.full_like(T, float("-inf")))
    best = masked.argmax(-1, keepdim=True)
    return {
        "T": T,
        "r": r,
        "local": local,
        "owned": owned,
        "has_entries": valid.any(-1),
        "teacher_entropy": entropy,
        "teacher_argmax": teacher.indices.gather(1, best)[:, 0].float(),
        "sum_TlogT": torch.xlogy(T, T).sum(-1),
        "sum_TT": (T * T).sum(-1),
        "kept": valid.sum(-1).float(),
    }


def _chunks(num_tokens: int, chunk: int):
    for start in range(0, num_tokens, chunk):
        yield start, min(start + chunk, num_tokens)


class FusedDistillLossFunction(torch.autograd.Function):
    """Per-token (1 - alpha) * CE + alpha * KD over vocab-sharded logits. See module doc."""

    @staticmethod
    def forward(ctx, student_Nv, labels_N, teacher_dense_Nv, teacher_idx_NK, teacher_logp_NK,
                spec: LossSpec, vocab: VocabInfo, tp_group, chunk_tokens: int, stats_log: list):
        num_tokens = student_Nv.shape[0]
        valid = vocab.valid_in_shard
        kind = "dense" if teacher_dense_Nv is not None else (
            "sparse" if teacher_idx_NK is not None else None)
        with_labels = labels_N is not None
        names = S.needed_stats(spec, kind, with_labels)
        sparse = None
        if kind == "sparse":
            sparse = _sparse_prep(SparseTeacher(teacher_idx_NK, teacher_logp_NK), spec, vocab)
        labels_local = (labels_N - vocab.shard_start) if with_labels else None
        device = student_Nv.device

        # 1. local statistics, one read of the logits
        local = torch.empty(num_tokens, 2 + len(names), device=device)
        for start, end in _chunks(num_tokens, chunk_tokens):
            local[start:end] = S.chunk_local_stats(
                student_Nv[start:end, :valid],
                teacher_dense_Nv[start:end, :valid] if kind == "dense" else None,
                _slice_sparse(sparse, start, end),
                labels_local[start:end] if with_labels else None,
                spec, names, vocab.shard_start,
            )
        # 2. one all-gather of the per-token rows; exact merge on every rank
        gathered = all_gather_stacked(local, tp_group)
        stats_log.append("all_gather")
        tau_s = spec.tau_student if kind else 1.0
        merged = S.merge_stats(gathered, names, tau_s)
        values = S.finalize(merged, spec, kind, sparse, vocab.true_size)

        # 3. JSD: second read for the log-mixture terms, one SUM all-reduce
        if S.has_second_pass(spec, kind):
            sums = torch.zeros(num_tokens, 2, device=device)
            for start, end in _chunks(num_tokens, chunk_tokens):
                sums[start:end] = _jsd_chunk_sums(
                    student_Nv[start:end, :valid],
                    teacher_dense_Nv[start:end, :valid] if kind == "dense" else None,
                    _slice_sparse(sparse, start, end), values, start, end, spec, tau_s)
            all_reduce_sum(sums, tp_group)
            stats_log.append("all_reduce")
            kd, W = sums[:, 0], sums[:, 1]
            if kind == "sparse":
                outside_value, outside_weighted, a = S.jsd_outside_terms(
                    spec, values["G"], sparse["r"])
                kd, W = kd + outside_value, W + outside_weighted
                values["a"] = a
            values["kd"] = kd * spec.kd_scale
            values["W"] = W

        zero = torch.zeros(num_tokens, device=device)
        ignored = (labels_N == spec.ignore_index) if with_labels else torch.zeros_like(
            zero, dtype=torch.bool)
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
        ctx.spec, ctx.vocab, ctx.kind, ctx.chunk = spec, vocab, kind, chunk_tokens
        ctx.with_labels, ctx.alpha = with_labels, alpha
        per_token = {k: values[k] for k in ("lse_s", "lse_t", "lse_1", "W", "a") if
                     values.get(k) is not None}
        ctx.per_token_names = list(per_token)
        ctx.sparse = sparse
        ctx.save_for_backward(student_Nv, labels_N, teacher_dense_Nv, ignored, keep_kd,
                              *per_token.values())
        outputs = [loss, lm.detach(), kd.detach()]
        for name in ("teacher_entropy", "agree", "kept"):
            outputs.append(aux[name].float() if aux[name] is not None else zero)
        for tensor in outputs[1:]:
            ctx.mark_non_differentiable(tensor)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        student_Nv, labels_N, teacher_Nv, ignored, keep_kd, *saved = ctx.saved_tensors
        per_token = dict(zip(ctx.per_token_names, saved))
        spec, vocab, kind = ctx.spec, ctx.vocab, ctx.kind
        valid = vocab.valid_in_shard
        grad = torch.zeros_like(student_Nv)
        ce_weight = ((1.0 - ctx.alpha) * grad_loss).masked_fill(ignored, 0.0)
        kd_weight = (ctx.alpha * spec.kd_scale * grad_loss).masked_fill(~keep_kd, 0.0)
        if kind:
            kd_weight = kd_weight / spec.tau_student
        for start, end in _chunks(student_Nv.shape[0], ctx.chunk):
            if valid == 0:
                break
            rows = slice(start, end)
            block = _grad_chunk(
                student_Nv[rows, :valid],
                labels_N[rows] - vocab.shard_start if ctx.with_labels else None,
                teacher_Nv[rows, :valid] if kind == "dense" else None,
                _slice_sparse(ctx.sparse, start, end),
                {k: v[rows] for k, v in per_token.items()},
                ce_weight[rows], kd_weight[rows], spec, kind, vocab.true_size,
            )
            grad[rows, :valid] = block.to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None, None


def _slice_sparse(sparse: dict | None, start: int, end: int) -> dict | None:
    if sparse is None:
        return None
    return {k: v[start:end] for k, v in sparse.items() if k in ("T", "local", "owned", "r")}


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


def _grad_chunk(student_Cv, labels_local, teacher_Cv, sparse, per_token, ce_weight, kd_weight,
                spec, kind, true_vocab):
    """d loss / d student logits for one chunk, fp32 [C, v]."""
    s_raw = student_Cv.float()
    width = s_raw.shape[1]
    grad = torch.zeros_like(s_raw)
    if labels_local is not None:
        lse_1 = per_token.get("lse_1", per_token["lse_s"])
        ce_grad = (s_raw - lse_1[:, None]).exp()
        owned = (labels_local >= 0) & (labels_local < width)
        rows = torch.arange(s_raw.shape[0], device=s_raw.device)[owned]
        ce_grad[rows, labels_local[owned]] -= 1.0
        grad += ce_weight[:, None] * ce_grad
    if kind is None:
        return grad
    tau_s = spec.tau_student
    s = s_raw / tau_s
    lse_s = per_token["lse_s"][:, None]
    P = (s - lse_s).exp()
    kd = spec.kind
    if kind == "dense":
        t = teacher_Cv.float() / spec.tau
        if kd == "mse_logits":
            kd_grad = 2.0 * (s - t) / true_vocab
        else:
            T = (t - per_token["lse_t"][:, None]).exp()
            if kd in ("soft_ce", "forward_kl"):
                kd_grad = P - T
            elif kd == "reverse_kl":
                kd_grad = P * ((s - lse_s) - (t - per_token["lse_t"][:, None])
                               - per_token["W"][:, None])
            elif kd == "mse_probs":
                kd_grad = 2.0 * P * ((P - T) - per_token["W"][:, None] / 2.0)
            else:  # jsd
                mix = spec.jsd_beta * T + (1 - spec.jsd_beta) * P
                w = (1 - spec.jsd_beta) * (S._log(P) - S._log(mix))
                kd_grad = P * (w - per_token["W"][:, None])
    else:
        W = per_token["W"][:, None]
        if kd == "mse_probs" and not spec.tail:
            kd_grad = P * (2.0 * P - W)
        else:
            kd_grad = P * (per_token["a"][:, None] - W)
        owned, local, T = sparse["owned"], sparse["local"], sparse["T"]
        P_kept = P.gather(1, local)
        if kd in ("soft_ce", "forward_kl"):
            kept_grad = P_kept - T
        elif kd == "reverse_kl":
            kept_grad = P_kept * (S._log(P_kept) - S._log(T) - W)
        elif kd == "mse_probs":
            kept_grad = P_kept * (2.0 * (P_kept - T) - W)
        else:  # jsd
            mix = spec.jsd_beta * T + (1 - spec.jsd_beta) * P_kept
            kept_grad = P_kept * ((1 - spec.jsd_beta) * (S._log(P_kept) - S._log(mix)) - W)
        # Replace the generic derivative by the kept entries' one, as an added difference:
        # foreign entries share clamped column indices and must add exactly nothing.
        delta = torch.where(owned, kept_grad - kd_grad.gather(1, local), torch.zeros_like(T))
        kd_grad.scatter_add_(1, local, delta)
    grad += kd_weight[:, None] * kd_grad
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
) -> dict:
    """Per-token {"loss" (differentiable), "lm", "kd", "teacher_entropy", "agree", "kept"}.

    Collective over ``tp_group`` (one all-gather; JSD adds one all-reduce). ``collectives``,
    if given, receives the name of each collective issued (tests count them).
    """
    spec.check_teacher(teacher)
    chunk = chunk_tokens or default_chunk_tokens(vocab.valid_in_shard)
    dense = teacher.logits if isinstance(teacher, DenseTeacher) else None
    idx = teacher.indices if isinstance(teacher, SparseTeacher) else None
    logp = teacher.logprobs if isinstance(teacher, SparseTeacher) else None
    log = collectives if collectives is not None else []
    loss, lm, kd, entropy, agree, kept = FusedDistillLossFunction.apply(
        student_logits_Nv, labels_N, dense, idx, logp, spec, vocab, tp_group, chunk, log)
    return {"loss": loss, "lm": lm, "kd": kd, "teacher_entropy": entropy, "agree": agree,
            "kept": kept}
