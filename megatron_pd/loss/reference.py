"""The dense single-device reference of every distillation loss: the oracle for the fast paths.

Straight from the definitions in loss/spec.py, with plain torch autograd over the full
(unsharded) vocabulary: log_softmax, xlogy, explicit categories for a sparse teacher. No
chunking, no statistics, no communication - slow and obviously right. Tests and benchmarks
import it; the fused paths must agree with it in value and gradient.

Shape legend: N tokens, V padded vocab (only the first ``true_vocab`` columns count),
K kept entries of a sparse teacher.
"""

from __future__ import annotations

import torch

from megatron_pd.loss.spec import DenseTeacher, LossSpec, SparseTeacher, sparse_teacher_distribution


def _kd_from_categories(kind: str, student_P, teacher_T, beta: float):
    """KD per token from category probabilities [N, C] (0 log 0 = 0 via xlogy)."""
    if kind in ("soft_ce", "forward_kl"):
        cross = -torch.xlogy(teacher_T, student_P).sum(-1)
        if kind == "soft_ce":
            return cross
        return torch.xlogy(teacher_T, teacher_T).sum(-1) + cross
    if kind == "reverse_kl":
        return (torch.xlogy(student_P, student_P) - torch.xlogy(student_P, teacher_T)).sum(-1)
    if kind == "jsd":
        mix = beta * teacher_T + (1.0 - beta) * student_P
        to_teacher = (torch.xlogy(teacher_T, teacher_T) - torch.xlogy(teacher_T, mix)).sum(-1)
        to_student = (torch.xlogy(student_P, student_P) - torch.xlogy(student_P, mix)).sum(-1)
        return beta * to_teacher + (1.0 - beta) * to_student
    if kind == "mse_probs":
        return ((student_P - teacher_T) ** 2).sum(-1)
    raise AssertionError(kind)


def reference_loss(
    student_logits_NV: torch.Tensor,
    labels_N: torch.Tensor | None,
    teacher,
    spec: LossSpec,
    true_vocab: int,
) -> dict:
    """Per-token losses {"loss", "lm", "kd"} [N] (fp32 or the input's float64), with autograd.

    ``teacher`` is a DenseTeacher with full [N, V] logits, a SparseTeacher, or None (alpha=0).
    """
    spec.check_teacher(teacher)
    dtype = torch.float64 if student_logits_NV.dtype == torch.float64 else torch.float32
    student = student_logits_NV[:, :true_vocab].to(dtype)
    num_tokens = student.shape[0]
    ignored = (
        labels_N == spec.ignore_index
        if labels_N is not None
        else torch.zeros(num_tokens, dtype=torch.bool, device=student.device)
    )
    zero = torch.zeros(num_tokens, dtype=dtype, device=student.device)
    if labels_N is not None:
        safe_labels = torch.where(ignored, torch.zeros_like(labels_N), labels_N)
        lm = torch.nn.functional.cross_entropy(student, safe_labels, reduction="none")
    else:
        lm = zero
    kd = zero
    if teacher is not None:
        log_P = torch.log_softmax(student / spec.tau_student, dim=-1)
        P = log_P.exp()
        if isinstance(teacher, DenseTeacher):
            teacher_scaled = teacher.logits[:, :true_vocab].to(dtype) / spec.tau
            if spec.kind == "mse_logits":
                kd = ((student / spec.tau_student - teacher_scaled) ** 2).mean(-1)
            else:
                T = torch.softmax(teacher_scaled, dim=-1)
                kd = _kd_from_categories(spec.kind, P, T, spec.jsd_beta)
        else:
            kd = _sparse_kd(P, teacher, spec, true_vocab, dtype)
        kd = kd * spec.kd_scale
    lm = torch.where(ignored, zero, lm)
    kd = torch.where(ignored, zero, kd)
    loss = (1.0 - spec.alpha) * lm + spec.alpha * kd
    return {"loss": loss, "lm": lm.detach(), "kd": kd.detach()}


def _sparse_kd(P, teacher: SparseTeacher, spec: LossSpec, true_vocab: int, dtype):
    """KD against kept entries: a dense teacher vector, plus a ghost category with the tail."""
    T_kept, r, _ = sparse_teacher_distribution(teacher, spec.tau, spec.tail, dtype)
    valid = teacher.valid
    index = torch.where(valid, teacher.indices, torch.zeros_like(teacher.indices)).long()
    T = torch.zeros_like(P)
    T.scatter_add_(1, index, torch.where(valid, T_kept.to(dtype), torch.zeros_like(P[:, :1])))
    if spec.tail:
        # Count, not assign: empty slots point at column 0 and must not unmark a kept column.
        kept = torch.zeros_like(P, dtype=torch.int64).scatter_add_(1, index, valid.long()) > 0
        outside = torch.where(kept, torch.zeros_like(P), P).sum(-1, keepdim=True)
        P = torch.cat([torch.where(kept, P, torch.zeros_like(P)), outside], dim=-1)
        T = torch.cat([T, r.to(dtype)[:, None]], dim=-1)
    kd = _kd_from_categories(spec.kind, P, T, spec.jsd_beta)
    has_entries = valid.any(dim=-1)
    return torch.where(has_entries, kd, torch.zeros_like(kd))
