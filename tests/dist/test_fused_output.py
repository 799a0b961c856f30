"""The fused output layer in the training step equals the logits path (loss.fused_output_layer).

One SGD step (lr = 1: the parameter change is the gradient) of the LM student with the fused
output layer at TP=2, PP=2 and TP=2 x PP=2, tied and untied embeddings, against the logits
path on one rank; the recorded logits of a pre-training run (train.record_logits) are the
same entries from hidden states as from logits; the costly distillation metrics are computed
on metric steps only. Distillation with a live teacher (the teacher's kept entries from its
hidden states, the hidden-state exchange) is covered in test_distill_layouts.py, whose
reference runs the logits path.
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

# fp32 sums in another order (chunked GEMMs, TP shards): ~1e-6 relative, as in
# test_parallel_parity; a wrong shard, scale or missing term moves values by > 1e-2.
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


def one_step(rank, world_size, tp, pp, fused, *extra):
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.parallel import topology

    cfg = tiny_config(
        f"--parallel.tp={tp}",
        f"--parallel.pp={pp}",
        f"--loss.fused_output_layer={str(fused).lower()}",
        "--loss.chunk_tokens=24",
        *extra,
    )
    dp = cfg.validate_for_world(world_size)
    groups = topology.init_student_groups(tp, pp)
    module = TrainModule(cfg, groups, cfg.model.vocab_size, dp)
    global_batch = synthetic_global_batch(cfg, step=0)
    batches = rank_microbatches(cfg, global_batch, dist.get_rank(groups.dp), dp)
    before = gather_global_state(module.model)
    result = module.train_step(batches, lr=1.0)
    after = gather_global_state(module.model)
    evaluated = module.eval_step(batches)
    if rank != 0:
        return None
    return {
        "loss": result.loss,
        "eval_loss": evaluated.loss,
        "tokens": result.tokens,
        "grads": {key: before[key] - after[key] for key in before},
    }


def assert_same_step(actual, expected):
    assert actual["tokens"] == expected["tokens"]
    assert actual["loss"] == pytest.approx(expected["loss"], rel=LOSS_RTOL)
    assert_same_grads(actual["grads"], expected["grads"], GRAD_RTOL, GRAD_ATOL)


TIED = {"tied": [], "untied": ["--model.tie_embeddings=false"]}


@pytest.fixture(scope="module")
def logits_path():
    return {
        name: run_distributed(one_step, 1, 1, 1, False, *extra)[0] for name, extra in TIED.items()
    }


@pytest.mark.parametrize(
    "world_size, tp, pp, embeddings",
    [
        (1, 1, 1, "tied"),
        (2, 2, 1, "tied"),
        (2, 2, 1, "untied"),
        (2, 1, 2, "tied"),
        (4, 2, 2, "untied"),
    ],
)
def test_fused_output_layer_equals_logits_path(logits_path, world_size, tp, pp, embeddings):
    """Loss and the gradient of every parameter (the tied embedding's, summed over its input
    and output uses, included); evaluation (no gradient made) gives the same loss."""
    actual = run_distributed(one_step, world_size, tp, pp, True, *TIED[embeddings])[0]
    expected = logits_path[embeddings]
    assert_same_step(actual, expected)
    assert actual["eval_loss"] == pytest.approx(expected["eval_loss"], rel=LOSS_RTOL)


def record_run(rank, world_size, fused, store_dir):
    """A 2-step pre-training run that records its own top-p-k logits."""
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.logits.store import StoreReader
    from megatron_pd.parallel import topology

    cfg = tiny_config(
        "--parallel.tp=2",
        f"--loss.fused_output_layer={str(fused).lower()}",
        "--train.record_truncation=top-0.9-12",
    )
    dp = cfg.validate_for_world(world_size)
    groups = topology.init_student_groups(2, 1)
    module = TrainModule(cfg, groups, cfg.model.vocab_size, dp)

    class Ids:  # the dataset description a store header records
        components, total = [], cfg.train.global_batch_size

        @staticmethod
        def fingerprint():
            return "synthetic"

    module.enable_recording(store_dir, Ids(), "tokenizer")
    batch = synthetic_global_batch(cfg, step=0)
    batch["sample_ids"] = torch.arange(cfg.train.global_batch_size)
    batches = rank_microbatches(cfg, batch, dist.get_rank(groups.dp), dp)
    module.train_step(batches, lr=0.0)
    module.recorder.finish(1)
    if rank != 0:
        return None
    reader = StoreReader(f"{store_dir}/train")
    return reader.get_many(list(range(cfg.train.global_batch_size)))


def test_recorded_logits_from_hidden_states_equal_logits_path(tmp_path):
    """train.record_logits of a fused run (top-p-k from hidden states, chunk by chunk)
    stores the same entries as the logits path."""
    ids_a, logp_a, tail_a = run_distributed(record_run, 2, True, str(tmp_path / "fused"))[0]
    ids_b, logp_b, tail_b = run_distributed(record_run, 2, False, str(tmp_path / "logits"))[0]
    assert (ids_a >= 0).sum() > 0
    assert (ids_a == ids_b).all()
    assert (logp_a == logp_b).all() and (tail_a == tail_b).all()  # quantised identically
