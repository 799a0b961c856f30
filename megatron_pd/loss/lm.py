"""Hard-label LM cross-entropy over a vocab-parallel logits shard (true vocabulary only).

Shape legend: N tokens (flattened batch x sequence), v this rank's vocab shard.

Forward: one all-reduce(MAX) of the per-token maximum and one all-reduce(SUM) of [N, 2]
(sum of exponentials, target logit - non-zero only on the rank owning the target). Backward
recomputes the softmax from the saved logits and the two per-token statistics; it needs no
communication. Columns of the padded vocabulary (ids >= true vocab size) are excluded, unlike
megatron's vocab_parallel_cross_entropy which treats them as real tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_pd.models.gpt import VocabInfo


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Per-token -log p(label) for logits sharded over the vocabulary across ``tp_group``."""

    @staticmethod
    def forward(ctx, logits_Nv, labels_N, vocab: VocabInfo, tp_group):
        valid = vocab.valid_in_shard
        logits = logits_Nv.float()
        if valid < logits.shape[-1]:
            logits = logits.clone()
            logits[:, valid:] = float("-inf")
        max_N = logits.max(dim=-1).values if valid > 0 else torch.full_like(logits[:, 0], -1e30)
        max_N = max_N.clamp_min(-1e30)  # a shard of padding only has -inf everywhere
        dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=tp_group)
        shifted = logits - max_N[:, None]
        local = labels_N - vocab.shard_start
        owned = (local >= 0) & (local < valid)
        local_clamped = local.clamp(0, max(valid - 1, 0))
        stats = torch.stack(
            [
                shifted.exp().sum(dim=-1),
                torch.where(owned, shifted.gather(1, local_clamped[:, None])[:, 0], 0.0),
            ],
            dim=-1,
        )
        dist.all_reduce(stats, group=tp_group)
        sum_exp_N, target_N = stats[:, 0], stats[:, 1]
        loss_N = sum_exp_N.log() - target_N
        ctx.save_for_backward(logits_Nv, max_N, sum_exp_N, local_clamped, owned)
        ctx.valid = valid
        return loss_N

    @staticmethod
    def backward(ctx, grad_N):
        logits_Nv, max_N, sum_exp_N, local, owned = ctx.saved_tensors
        valid = ctx.valid
        grad = (logits_Nv.float() - max_N[:, None]).exp() / sum_exp_N[:, None]
        grad[:, valid:] = 0.0
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows[owned], local[owned]] -= 1.0
        grad.mul_(grad_N[:, None])
        return grad.to(logits_Nv.dtype), None, None, None


def vocab_parallel_cross_entropy(logits_Nv, labels_N, vocab: VocabInfo, tp_group):
    """Per-token hard-label cross-entropy [N] (fp32); see module docstring. Collective on tp."""
    return VocabParallelCrossEntropyFunction.apply(logits_Nv, labels_N, vocab, tp_group)
