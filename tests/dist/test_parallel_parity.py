"""TP, PP and DP (distributed optimizer) give the same logits, losses and gradients as 1 rank.

Weights are identical across layouts by construction (layout-invariant init), so every
comparison is direct. Gradients are read as the parameter change of one SGD step with
lr = 1 (momentum's first step is the plain gradient; no weight decay, no clipping); the
distributed optimizer (Adam only) is compared by its parameter updates over two steps.
"""

import pytest
import torch
import torch.distributed as dist

from _dist import run_distributed
from _models import (
    assert_same_grads,
    gather_global_state,
    rank_microbatches,
    synthetic_global_batch,
    tiny_config,
)

# fp32 sums over a different split (TP shards, micro-batches, DP ranks) reorder additions:
# relative error of order 1e-6 on losses and gradients; 1e-4/1e-6 leaves margin and still
# catches any real mismatch (a wrong shard or scale moves values by > 1e-2).
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
LOGIT_ATOL = 1e-5


def one_step(rank, world_size, tp, pp, *extra, steps=1, lr=1.0):
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.parallel import topology

    cfg = tiny_config(f"--parallel.tp={tp}", f"--parallel.pp={pp}", *extra)
    dp = cfg.validate_for_world(world_size)
    groups = topology.init_student_groups(tp, pp)
    module = TrainModule(cfg, groups, cfg.model.vocab_size, dp)
    global_batch = synthetic_global_batch(cfg, step=0)
    logits = None
    if pp == 1:
        logits = _full_logits(module, global_batch, groups)
    before = gather_global_state(module.model)
    batches = rank_microbatches(cfg, global_batch, dist.get_rank(groups.dp), dp)
    for step in range(steps):
        global_batch = synthetic_global_batch(cfg, step=step)
        batches = rank_microbatches(cfg, global_batch, dist.get_rank(groups.dp), dp)
        result = module.train_step(batches, lr=lr)
    after = gather_global_state(module.model)
    grads = {key: before[key] - after[key] for key in before}
    params = module.num_parameters()
    if rank != 0:
        return None
    return {
        "loss": result.loss,
        "tokens": result.tokens,
        "grads": grads,
        "logits": logits,
        "params": params,
        "grad_norm": result.grad_norm,
    }


def _full_logits(module, batch, groups):
    from megatron_pd.models.gpt import causal_attention_mask

    with torch.no_grad():
        tokens = batch["tokens"][:2]
        seq = tokens.shape[1]
        shard = module.model(tokens, batch["position_ids"][:2], causal_attention_mask(seq))
        pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(groups.tp))]
        dist.all_gather(pieces, shard.contiguous(), group=groups.tp)
    return torch.cat(pieces, dim=-1)[..., : module.vocab.true_size]


@pytest.fixture(scope="module")
def reference():
    return run_distributed(one_step, 1, 1, 1)[0]


def assert_same_step(actual, expected):
    assert actual["tokens"] == expected["tokens"]
    # the parameter count printed at start: each parameter once, whatever the layout (norms
    # replicated over TP, the last stage's copy of tied embeddings)
    assert (
        actual["params"] == expected["params"] == sum(g.numel() for g in expected["grads"].values())
    )
    # megatron's gradient norm (what clipping uses) sees every shard once
    assert actual["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    assert actual["loss"] == pytest.approx(expected["loss"], rel=LOSS_RTOL)
    assert_same_grads(actual["grads"], expected["grads"], GRAD_RTOL, GRAD_ATOL)


@pytest.mark.parametrize("world_size, tp", [(2, 2), (4, 4)])
def test_tensor_parallel_matches_single_rank(reference, world_size, tp):
    actual = run_distributed(one_step, world_size, tp, 1)[0]
    torch.testing.assert_close(actual["logits"], reference["logits"], rtol=0, atol=LOGIT_ATOL)
    assert_same_step(actual, reference)


def test_pipeline_parallel_matches_single_rank(reference):
    actual = run_distributed(one_step, 2, 1, 2)[0]
    assert_same_step(actual, reference)


def test_tp2_pp2_matches_single_rank(reference):
    actual = run_distributed(one_step, 4, 2, 2)[0]
    assert_same_step(actual, reference)


ADAM = (
    "--optimizer.name=adamw",
    "--parallel.distributed_optimizer=true",
    "--optimizer.adam_eps=1e-3",
    "--optimizer.weight_decay=0.1",
)


def test_data_parallel_distributed_optimizer_matches_single_rank():
    # Two AdamW steps (moments and bias correction exercised). eps=1e-3 keeps the update a
    # smooth function of the gradient, so it reflects gradient differences instead of signs.
    expected = run_distributed(one_step, 1, 1, 1, *ADAM, steps=2, lr=1e-2)[0]
    actual = run_distributed(one_step, 2, 1, 1, *ADAM, steps=2, lr=1e-2)[0]
    assert_same_step(actual, expected)


def test_untied_embeddings_pipeline(reference):
    untied_ref = run_distributed(one_step, 1, 1, 1, "--model.tie_embeddings=false")[0]
    actual = run_distributed(one_step, 2, 1, 2, "--model.tie_embeddings=false")[0]
    assert_same_step(actual, untied_ref)
