"""Tiny student configs, synthetic batches and global-state gathering for multi-rank tests.

Everything here runs inside ranks started by ``_dist.run_distributed``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_pd.config import load_config


def tiny_config(*overrides, seq_length: int = 32, vocab: int = 509):
    """A small student Config (vocab 509 is prime: padded columns exist at any TP)."""
    base = [
        "--model.num_layers=4",
        "--model.hidden_size=64",
        "--model.ffn_hidden_size=96",
        "--model.num_attention_heads=8",
        "--model.num_query_groups=4",
        f"--model.vocab_size={vocab}",
        "--model.make_vocab_size_divisible_by=16",
        f"--data.seq_length={seq_length}",
        "--train.micro_batch_size=2",
        "--train.global_batch_size=8",
        "--train.precision=fp32",
        "--optimizer.weight_decay=0.0",
        "--optimizer.clip_grad=0.0",
        "--optimizer.name=sgd",
        "--parallel.distributed_optimizer=false",
    ]
    return load_config(None, base + list(overrides))


def synthetic_global_batch(cfg, step: int, seed: int = 0) -> dict:
    """The whole global batch of ``step`` [G, S], with some loss-mask holes."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    size, seq = cfg.train.global_batch_size, cfg.data.seq_length
    text = torch.randint(0, cfg.model.vocab_size, (size, seq + 1), generator=g)
    mask = (torch.rand(size, seq, generator=g) > 0.1).float()
    return {
        "tokens": text[:, :-1].contiguous(),
        "labels": text[:, 1:].contiguous(),
        "loss_mask": mask,
        "position_ids": torch.arange(seq).expand(size, seq).contiguous(),
    }


def rank_microbatches(cfg, global_batch: dict, dp_rank: int, dp_size: int) -> list:
    """This DP rank's contiguous block of the global batch, cut into micro-batches."""
    per_rank = cfg.train.global_batch_size // dp_size
    mbs = cfg.train.micro_batch_size
    start = dp_rank * per_rank
    return [
        {k: v[start + i : start + i + mbs] for k, v in global_batch.items()}
        for i in range(0, per_rank, mbs)
    ]


def assert_same_grads(actual: dict, expected: dict, rtol: float, atol: float) -> None:
    """Two {key: full gradient} dicts: the same keys, no zero reference, close within tol."""
    assert actual.keys() == expected.keys()
    for key, grad in expected.items():
        assert grad.abs().max() > 0, f"{key}: reference gradient is zero"
        torch.testing.assert_close(
            actual[key], grad, rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}"
        )


def gather_global_state(model) -> dict:
    """{checkpoint key: full tensor} of a (TP/PP-sharded) model, on every rank.

    Uses the model's sharded state dict (global shapes and offsets), the same description
    dist_checkpointing reshards with.
    """
    from megatron_pd.models.init import _sharded_tensors

    inner = getattr(model, "module", model)
    local = [
        (sh.key, tuple(sh.global_shape), tuple(sh.global_offset), sh.data.detach().float().clone())
        for sh in _sharded_tensors(inner)
    ]
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    full = {}
    for shards in everything:
        for key, shape, offset, data in shards:
            tensor = full.setdefault(key, torch.zeros(shape))
            n_pre = len(shape) - data.dim()
            index = tuple(offset[:n_pre]) + tuple(
                slice(o, o + s) for o, s in zip(offset[n_pre:], data.shape)
            )
            tensor[index] = data
    return full
