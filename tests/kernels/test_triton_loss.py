"""Triton kernels of the fused loss (CPU interpreter here, GPU when present) vs the reference.

Rows span several 16-column tiles (the kernels' online max rescaling is exercised), the last
shard has padding columns, TP = 1 and 2, every loss kind, dense and sparse teachers; fp32
inputs and bf16 inputs (gradient written in bf16).
"""

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

from megatron_pd.loss import triton_kernels
from megatron_pd.loss.reference import reference_loss
from megatron_pd.loss.spec import KD_KINDS, DenseTeacher, LossSpec, SparseTeacher
from megatron_pd.loss.vocab_parallel import fused_distill_loss
from megatron_pd.parallel.vocab import VocabInfo

pytestmark = pytest.mark.skipif(
    not triton_kernels.triton_available()[0], reason=triton_kernels.triton_available()[1]
)

TRUE_VOCAB, PADDED, TOKENS, KEEP = 97, 104, 6, 6
# fp32: same fp32 arithmetic as the torch path, in another order: ~1e-6.
FP32_ATOL = 2e-5
# bf16 inputs: the reference sees the same bf16-rounded logits, so losses agree to fp32
# rounding; gradients are rounded to bf16 (8 mantissa bits, relative error <= 2^-9).
BF16_LOSS_ATOL, BF16_GRAD_RTOL, BF16_GRAD_ATOL = 1e-4, 1e-2, 2e-3

CASES = [(kind, "dense", False) for kind in KD_KINDS] + [
    (kind, "sparse", tail)
    for kind in KD_KINDS
    if kind != "mse_logits"
    for tail in (False, True)
    if not (kind == "reverse_kl" and not tail)
]


def inputs(dtype):
    g = torch.Generator().manual_seed(2)
    student = (torch.randn(TOKENS, PADDED, generator=g) * 3).to(dtype)
    teacher = (torch.randn(TOKENS, PADDED, generator=g) * 3).to(dtype)
    labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=g)
    labels[1] = -100
    logp = torch.log_softmax(teacher[:, :TRUE_VOCAB].double(), -1)
    values, index = logp.topk(KEEP, -1)
    index[3, 4:] = -1
    values = torch.where(index >= 0, values, torch.zeros_like(values))
    student[0, index[0, 0]] = 30.0  # confident: almost no student mass outside the kept set
    labels[0] = index[0, 0]  # and the label is a kept column
    return student, teacher, labels, SparseTeacher(index, values)


def run_cases(rank, world_size, dtype, tau, impl):
    triton_kernels.MAX_BLOCK = 16
    student, teacher_logits, labels, sparse = inputs(dtype)
    width = PADDED // world_size
    cols = slice(rank * width, (rank + 1) * width)
    vocab = VocabInfo(TRUE_VOCAB, PADDED, world_size, rank)
    results = []
    for kind, teacher_kind, tail in CASES:
        spec = LossSpec(kind=kind, alpha=0.7, tau=tau, tail=tail)
        x = student[:, cols].clone().requires_grad_()
        teacher = (
            DenseTeacher(teacher_logits[:, cols])
            if teacher_kind == "dense"
            else SparseTeacher(sparse.indices, sparse.logprobs.float())
        )
        out = fused_distill_loss(x, labels, teacher, spec, vocab, dist.group.WORLD, impl=impl)
        out["loss"].sum().backward()
        results.append((out["loss"].detach(), x.grad, out["agree"], out["teacher_entropy"]))
    return results


def reference(dtype, tau, case):
    kind, teacher_kind, tail = case
    student, teacher_logits, labels, sparse = inputs(dtype)
    x = student.double().requires_grad_()
    teacher = DenseTeacher(teacher_logits.double()) if teacher_kind == "dense" else sparse
    spec = LossSpec(kind=kind, alpha=0.7, tau=tau, tail=tail)
    out = reference_loss(x, labels, teacher, spec, TRUE_VOCAB)
    out["loss"].sum().backward()
    return out["loss"].detach(), x.grad


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_triton_fp32_equals_reference(world_size, tau):
    results = run_distributed(run_cases, world_size, torch.float32, tau, "triton")
    width = PADDED // world_size
    for index, case in enumerate(CASES):
        expected_loss, expected_grad = reference(torch.float32, tau, case)
        for rank in range(world_size):
            loss, grad, _, _ = results[rank][index]
            torch.testing.assert_close(
                loss.double(),
                expected_loss,
                rtol=0,
                atol=FP32_ATOL,
                msg=lambda m, c=case: f"{c}: {m}",
            )
            torch.testing.assert_close(
                grad.double(),
                expected_grad[:, rank * width : (rank + 1) * width],
                rtol=0,
                atol=FP32_ATOL,
                msg=lambda m, c=case: f"{c}: {m}",
            )


def test_triton_bf16_gradients_in_bf16():
    results = run_distributed(run_cases, 1, torch.bfloat16, 1.0, "triton")[0]
    for index, case in enumerate(CASES):
        expected_loss, expected_grad = reference(torch.bfloat16, 1.0, case)
        loss, grad, _, _ = results[index]
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(loss.double(), expected_loss, rtol=0, atol=BF16_LOSS_ATOL)
        torch.testing.assert_close(
            grad.double(),
            expected_grad,
            rtol=BF16_GRAD_RTOL,
            atol=BF16_GRAD_ATOL,
            msg=lambda m, c=case: f"{c}: {m}",
        )


def test_triton_metrics_equal_torch_path():
    triton_out = run_distributed(run_cases, 2, torch.float32, 1.0, "triton")
    torch_out = run_distributed(run_cases, 2, torch.float32, 1.0, "torch")
    for rank in range(2):
        for (_, _, agree_a, ent_a), (_, _, agree_b, ent_b) in zip(
            triton_out[rank], torch_out[rank]
        ):
            assert torch.equal(agree_a, agree_b)
            torch.testing.assert_close(ent_a, ent_b, rtol=0, atol=FP32_ATOL)


def test_unavailable_triton_is_an_error(monkeypatch):
    monkeypatch.setattr(triton_kernels, "triton_available", lambda: (False, "no CUDA device"))
    with pytest.raises(RuntimeError, match="'triton' cannot run here: no CUDA device"):
        fused_distill_loss(
            torch.zeros(2, 4),
            None,
            None,
            LossSpec(alpha=0.0),
            VocabInfo(4, 4, 1, 0),
            None,
            impl="triton",
        )
