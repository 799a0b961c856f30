"""One entry point for the distillation objective, with four interchangeable implementations.

    distillation_loss(student_logits_Nv, labels_N, teacher, spec, vocab, tp_group, impl=...)

* ``reference``: gathers the vocabulary shards (autograd-aware) and evaluates the dense
  definition in loss/reference.py - slow, for debugging a run at any TP.
* ``torch``: the fused vocab-parallel autograd Function (loss/vocab_parallel.py).
* ``triton``: the same Function with its row passes in Triton kernels (GPU, or the CPU
  interpreter); an error where Triton cannot run.
* ``compiled``: the same Function with its row passes as torch code compiled by inductor
  (loss/compiled_kernels.py: fused C++ loops on CPU); an error where it cannot compile.
``auto`` picks triton on CUDA when Triton imports, torch otherwise. The choice is logged once
per process. All return per-token {"loss", "lm", "kd", "teacher_entropy", "agree", "kept"}.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from megatron_pd.loss import compiled_kernels, triton_kernels
from megatron_pd.loss.reference import reference_loss
from megatron_pd.loss.spec import (
    IMPLEMENTATIONS,
    DenseTeacher,
    LossSpec,
    SparseTeacher,
    sparse_teacher_distribution,
)
from megatron_pd.loss.spec import check_inputs as validate_inputs
from megatron_pd.loss.vocab_parallel import fused_distill_loss
from megatron_pd.parallel.collectives import all_gather_stacked
from megatron_pd.parallel.vocab import VocabInfo

logger = logging.getLogger("megatron_pd.loss")
_announced: set = set()


def announce(impl: str, what: str = "distillation loss") -> None:
    """Log the implementation in use, once per process and kind."""
    if (impl, what) not in _announced:
        _announced.add((impl, what))
        logger.info("%s implementation: %s", what, impl)


def resolve_implementation(requested: str) -> str:
    """'reference', 'torch', 'triton' or 'compiled' for a config value (``auto`` included)."""
    if requested == "auto":
        return "triton" if torch.cuda.is_available() and triton_kernels.HAVE_TRITON else "torch"
    if requested not in IMPLEMENTATIONS:
        raise ValueError(
            f"loss implementation {requested!r}: must be auto or one of "
            f"{', '.join(IMPLEMENTATIONS)}"
        )
    if requested == "triton":
        usable, why = triton_kernels.triton_available()
        if not usable:
            raise RuntimeError(f"loss implementation 'triton' cannot run here: {why}")
    if requested == "compiled":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        usable, why = compiled_kernels.compiled_available(device)
        if not usable:
            raise RuntimeError(f"loss implementation 'compiled' cannot run here: {why}")
    return requested


class _GatherVocabFunction(torch.autograd.Function):
    """[N, v] shard -> [N, V] full logits over ``group``; backward returns this rank's slice."""

    @staticmethod
    def forward(ctx, shard_Nv, group):
        ctx.rank, ctx.width = dist.get_rank(group), shard_Nv.shape[1]
        gathered = all_gather_stacked(shard_Nv.contiguous(), group)  # [R, N, v]
        return torch.cat(list(gathered), dim=1)

    @staticmethod
    def backward(ctx, grad_NV):
        start = ctx.rank * ctx.width
        return grad_NV[:, start : start + ctx.width].contiguous(), None


def _reference(student_Nv, labels_N, teacher, spec, vocab, tp_group) -> dict:
    full = _GatherVocabFunction.apply(student_Nv, tp_group)
    if isinstance(teacher, DenseTeacher):
        teacher = DenseTeacher(_GatherVocabFunction.apply(teacher.logits.detach(), tp_group))
    out = reference_loss(full, labels_N, teacher, spec, vocab.true_size)
    zeros = torch.zeros_like(out["lm"])
    with torch.no_grad():
        if isinstance(teacher, DenseTeacher):
            log_T = torch.log_softmax(teacher.logits[:, : vocab.true_size].float() / spec.tau, -1)
            entropy = -torch.where(log_T > -math.inf, log_T.exp() * log_T, 0.0).sum(-1)
            agree = (full[:, : vocab.true_size].argmax(-1) == log_T.argmax(-1)).float()
        elif isinstance(teacher, SparseTeacher):
            T, r, _ = sparse_teacher_distribution(teacher, spec.tau, spec.tail)
            entropy = -torch.xlogy(T, T).sum(-1) - (torch.xlogy(r, r) if spec.tail else 0.0)
            masked = torch.where(
                teacher.valid, teacher.logprobs.float(), torch.full_like(T, float("-inf"))
            )
            best = teacher.indices.gather(1, masked.argmax(-1, keepdim=True))[:, 0]
            agree = (full[:, : vocab.true_size].argmax(-1) == best).float()
        else:
            entropy, agree = zeros, zeros
    kept = teacher.kept_counts().float() if isinstance(teacher, SparseTeacher) else zeros
    return {**out, "teacher_entropy": entropy, "agree": agree, "kept": kept}


def distillation_loss(
    student_logits_Nv: torch.Tensor,
    labels_N: torch.Tensor | None,
    teacher,
    spec: LossSpec,
    vocab: VocabInfo,
    tp_group,
    impl: str = "torch",
    chunk_tokens: int | None = None,
    metrics: bool = True,
    check_inputs: bool = True,
) -> dict:
    """Per-token (1 - alpha) * CE + alpha * KD; collective over ``tp_group``. See module doc.

    Input that the loss would misread is a ValueError naming the tensor (spec.check_inputs):
    shapes always; with ``check_inputs`` also the values (label range, sparse ids in range
    and unique, log-probs <= 0). The training engine turns the value checks off
    (``loss.check_inputs``) because its producers - truncation, exchange, store decode -
    check what they produce.
    """
    impl = resolve_implementation(impl)
    announce(impl)
    spec.check_teacher(teacher)
    validate_inputs(
        student_logits_Nv, labels_N, teacher, spec, vocab, values=check_inputs, tp_group=tp_group
    )
    if impl == "reference":
        return _reference(student_logits_Nv, labels_N, teacher, spec, vocab, tp_group)
    return fused_distill_loss(
        student_logits_Nv,
        labels_N,
        teacher,
        spec,
        vocab,
        tp_group,
        chunk_tokens=chunk_tokens,
        metrics=metrics,
        impl=impl,
    )
