"""The fused loss's row kernels vs the reference: the Triton kernels (CPU interpreter here, GPU
when present) and the inductor-compiled ones (loss/compiled_kernels.py: C++ on CPU).

Rows span several 16-column tiles (the Triton kernels' online max rescaling is exercised), the
compiled kernels run on blocks of a few rows, the last shard has padding columns, TP = 1 and
2, every loss kind, dense and sparse teachers; fp32 inputs and bf16 inputs (gradient written in
bf16). Both implementations' metrics (top-1 agreement, teacher entropy) equal the torch
path's.
"""

import functools

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

from megatron_pd.loss import compiled_kernels, triton_kernels
from megatron_pd.loss.reference import reference_loss
from megatron_pd.loss.spec import KD_KINDS, DenseTeacher, LossSpec, SparseTeacher
from megatron_pd.loss.vocab_parallel import fused_distill_loss
from megatron_pd.parallel.vocab import VocabInfo

AVAILABLE = {
    "triton": triton_kernels.triton_available(),
    "compiled": compiled_kernels.compiled_available("cpu"),
}


def _skip(impl):
    ok, why = AVAILABLE[impl]
    return pytest.mark.skipif(not ok, reason=f"{impl}: {why}")


IMPLS = [pytest.param(impl, marks=_skip(impl)) for impl in AVAILABLE]

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


def run_cases(rank, world_size, dtype, tau, impl, cases=CASES):
    triton_kernels.MAX_BLOCK = 16
    compiled_kernels.BLOCK_ELEMENTS = 250  # calls of 2 rows (TP=1) and 4 + 2 rows (TP=2)
    student, teacher_logits, labels, sparse = inputs(dtype)
    width = PADDED // world_size
    cols = slice(rank * width, (rank + 1) * width)
    vocab = VocabInfo(TRUE_VOCAB, PADDED, world_size, rank)
    results = []
    for kind, teacher_kind, tail in cases:
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


@functools.cache
def results_of(impl, world_size, dtype, tau, cases=tuple(CASES)):
    """Every rank's results (shared by the tests that read the same run)."""
    return run_distributed(run_cases, world_size, dtype, tau, impl, list(cases))


# the compiled kernels run one of the four (every configuration is a compile: ~2 s each, in
# every process), at TP = 2 (the merge of the ranks' statistics) and tau != 1
FP32_RUNS = [
    pytest.param(impl, world_size, tau, marks=_skip(impl))
    for impl in AVAILABLE
    for world_size, tau in ((2, 2.0), (1, 0.5), (2, 0.5), (1, 2.0))[: 4 if impl == "triton" else 1]
]


@pytest.mark.parametrize("impl, world_size, tau", FP32_RUNS)
def test_row_kernels_fp32_equal_reference(impl, world_size, tau):
    results = results_of(impl, world_size, torch.float32, tau)
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


@pytest.mark.parametrize("impl", IMPLS)
def test_row_kernels_bf16_gradients_in_bf16(impl):
    # compiled: a few kinds (the conversions are the same code for all)
    cases = CASES if impl == "triton" else [c for c in CASES if c[0] in ("forward_kl", "jsd")]
    results = results_of(impl, 1, torch.bfloat16, 1.0, tuple(cases))[0]
    for index, case in enumerate(cases):
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


@pytest.mark.parametrize("impl", IMPLS)
def test_row_kernels_metrics_equal_torch_path(impl):
    """Top-1 agreement (argmax ties: the first column) and teacher entropy, TP = 2."""
    kernel_out = results_of(impl, 2, torch.float32, 2.0)
    torch_out = results_of("torch", 2, torch.float32, 2.0)
    for rank in range(2):
        for (_, _, agree_a, ent_a), (_, _, agree_b, ent_b) in zip(
            kernel_out[rank], torch_out[rank]
        ):
            assert torch.equal(agree_a, agree_b)
            torch.testing.assert_close(ent_a, ent_b, rtol=0, atol=FP32_ATOL)


@pytest.mark.skipif(not AVAILABLE["triton"][0], reason=AVAILABLE["triton"][1])
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


def test_unavailable_compiler_is_an_error(monkeypatch):
    monkeypatch.setattr(
        compiled_kernels, "compiled_available", lambda device: (False, "no C++ compiler 'g++'")
    )
    with pytest.raises(RuntimeError, match="'compiled' cannot run here: no C\\+\\+ compiler"):
        fused_distill_loss(
            torch.zeros(2, 4),
            None,
            None,
            LossSpec(alpha=0.0),
            VocabInfo(4, 4, 1, 0),
            None,
            impl="compiled",
        )
