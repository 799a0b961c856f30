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
