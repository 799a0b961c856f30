"""The fused loss at alpha = 0 (plain LM cross-entropy, what pre-training uses) equals torch's
cross_entropy on 1/2/4 ranks with padded vocab columns, and megatron-core's own
vocab_parallel_cross_entropy where there is no padding."""

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

from megatron_pd.loss.spec import LossSpec
from megatron_pd.loss.vocab_parallel import fused_distill_loss
from megatron_pd.parallel.vocab import VocabInfo


def vocab_parallel_cross_entropy(logits, labels, vocab, group):
    return fused_distill_loss(logits, labels, None, LossSpec(alpha=0.0), vocab, group,
                              chunk_tokens=7)["loss"]

TRUE_VOCAB, PADDED_VOCAB, TOKENS = 101, 112, 24
# fp32 log-sum-exp over a split vocabulary: differences are rounding, ~1e-6.
ATOL = 2e-6


def global_inputs(padded=PADDED_VOCAB):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(TOKENS, padded, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=g)
    weights = torch.rand(TOKENS, generator=g, dtype=torch.float64)
    return logits, labels, weights


def shard_loss_and_grad(rank, world_size, padded):
    logits, labels, weights = global_inputs(padded)
    shard = padded // world_size
    local = logits[:, rank * shard : (rank + 1) * shard].float().clone().requires_grad_()
    vocab = VocabInfo(TRUE_VOCAB, padded, world_size, rank)
    loss = vocab_parallel_cross_entropy(local, labels, vocab, dist.group.WORLD)
    (loss.double() * weights).sum().backward()
    return loss.detach(), local.grad


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_matches_torch_cross_entropy(world_size):
    logits, labels, weights = global_inputs()
    reference = logits[:, :TRUE_VOCAB].clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(reference, labels, reduction="none")
    (expected * weights).sum().backward()
    expected_grad = torch.zeros_like(logits)
    expected_grad[:, :TRUE_VOCAB] = reference.grad
    results = run_distributed(shard_loss_and_grad, world_size, PADDED_VOCAB)
    shard = PADDED_VOCAB // world_size
    for rank, (loss, grad) in enumerate(results):
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=0, atol=ATOL)
        torch.testing.assert_close(
            grad.double(), expected_grad[:, rank * shard : (rank + 1) * shard], rtol=0, atol=ATOL
        )


def megatron_loss(rank, world_size):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as mcore_ce

    from megatron_pd.parallel import topology

    topology.init_student_groups(world_size, 1)
    logits, labels, _ = global_inputs(padded=TRUE_VOCAB + 3)  # 104: divisible by 2 and 4
    vocab_size = logits.shape[1]
    shard = vocab_size // world_size
    local = logits[:, rank * shard : (rank + 1) * shard].float()
    theirs = mcore_ce(local[:, None, :].clone(), labels[:, None])[:, 0]
    ours = vocab_parallel_cross_entropy(
        local, labels, VocabInfo(vocab_size, vocab_size, world_size, rank), dist.group.WORLD
    )
    return theirs, ours


@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_megatron_without_padding(world_size):
    for theirs, ours in run_distributed(megatron_loss, world_size):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
