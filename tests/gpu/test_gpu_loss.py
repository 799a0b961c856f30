"""GPU checks (run only where CUDA exists): compiled Triton kernels and bf16 on real shapes.

The CPU suite covers the same math under the Triton interpreter; these confirm the compiled
kernels (loop-carried types, tile sizes up to 4096, bf16 stores) at a GLM-4-sized vocabulary.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _group():
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl", rank=0, world_size=1)
    return dist.group.WORLD


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "soft_ce", "jsd", "mse_probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_equals_torch_on_gpu(kind, dtype):
    from megatron_pd.loss.spec import DenseTeacher, LossSpec
    from megatron_pd.loss.vocab_parallel import fused_distill_loss
    from megatron_pd.parallel.vocab import VocabInfo

    torch.manual_seed(0)
    tokens, vocab = 512, 151552
    student = (torch.randn(tokens, vocab, device="cuda") * 2).to(dtype)
    teacher = (torch.randn(tokens, vocab, device="cuda") * 2).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    spec = LossSpec(kind=kind, alpha=0.9, tau=2.0)
    info = VocabInfo(vocab - 7, vocab, 1, 0)
    results = {}
    for impl in ("torch", "triton"):
        x = student.clone().requires_grad_()
        out = fused_distill_loss(x, labels, DenseTeacher(teacher), spec, info, _group(), impl=impl)
        out["loss"].sum().backward()
        results[impl] = (out["loss"].float(), x.grad.float())
    loss_tol = 1e-4 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=loss_tol)
    grad_tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-2, atol=grad_tol)


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_fused_output_layer_on_gpu(teacher_kind):
    """The fused output layer (Triton row kernels on each chunk, bf16) equals the logits path
    (bf16 logits, the torch loss) at a GLM-4-sized vocabulary: loss, dL/dh and dL/dW."""
    from megatron_pd.loss.fused_linear import fused_linear_distillation_loss
    from megatron_pd.loss.objective import distillation_loss
    from megatron_pd.loss.spec import DenseTeacher, LossSpec, SparseTeacher
    from megatron_pd.parallel.vocab import VocabInfo

    torch.manual_seed(0)
    tokens, hidden, vocab = 512, 1024, 151552
    h = (torch.randn(tokens, hidden, device="cuda") / hidden**0.5).bfloat16()
    w = torch.randn(vocab, hidden, device="cuda").bfloat16()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    if teacher_kind == "dense":
        teacher = DenseTeacher((torch.randn(tokens, vocab, device="cuda") * 2).bfloat16())
    else:
        ids = torch.stack([torch.randperm(vocab, device="cuda")[:50] for _ in range(tokens)])
        logp = torch.log_softmax(torch.randn(tokens, 50, device="cuda"), -1) - 0.1
        teacher = SparseTeacher(ids, logp)
    spec = LossSpec(kind="forward_kl", alpha=0.9, tau=2.0)
    info = VocabInfo(vocab, vocab, 1, 0)
    mask = torch.ones(tokens, device="cuda")
    results = {}
    for path in ("logits", "fused"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if path == "logits":
            out = distillation_loss(hh @ ww.t(), labels, teacher, spec, info, _group())
            total = (out["loss"] * mask).sum()
        else:
            out = fused_linear_distillation_loss(
                hh, ww, labels, mask, teacher, spec, info, _group(), impl="triton"
            )
            total = out["weighted"]
        total.backward()
        results[path] = (total.float(), hh.grad.float(), ww.grad.float())
    # bf16 logits and gradients on both sides, rounded at different points: relative 1e-2
    for got, want in zip(results["fused"], results["logits"]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
