"""The megatron-core CPU adaptation: off when CUDA exists, and every patch really fires."""

import os

import torch

from _dist import run_distributed
from _models import rank_microbatches, synthetic_global_batch, tiny_config
from megatron_pd.platform import cpu_adapter


def test_inactive_when_cuda_is_available(monkeypatch):
    assert not cpu_adapter.is_active()  # the pytest process itself never activates it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream,
              torch.Tensor.cuda, torch.nn.Module.cuda, torch.Tensor.type)
    assert cpu_adapter.activate() is False
    assert not cpu_adapter.is_active()
    after = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream,
             torch.Tensor.cuda, torch.nn.Module.cuda, torch.Tensor.type)
    assert before == after
    from megatron.core.tensor_parallel import random as mcore_random

    assert mcore_random.CudaRNGStatesTracker.__name__ == "CudaRNGStatesTracker"


def exercise_every_patch(rank, world_size, save_dir):
    """Build a TP1/PP2 tied-embedding student, train a step, save and load a checkpoint."""
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.models.checkpoint import CheckpointManager, latest_checkpoint, load_checkpoint
    from megatron_pd.parallel import topology

    assert cpu_adapter.is_active()
    cpu_adapter.reset_patch_hits()
    cfg = tiny_config("--parallel.pp=2", "--model.tie_embeddings=true",
                      "--optimizer.name=adamw", "--parallel.distributed_optimizer=true",
                      "--model.hidden_dropout=0.1")
    groups = topology.init_student_groups(1, 2)
    module = TrainModule(cfg, groups, cfg.model.vocab_size, 1)
    hits = {"build": cpu_adapter.patch_hits()}
    batches = rank_microbatches(cfg, synthetic_global_batch(cfg, 0), 0, 1)
    module.train_step(batches, lr=1e-3)
    hits["step"] = cpu_adapter.patch_hits()
    manager = CheckpointManager(save_dir, keep_last=1)
    manager.save(module, 1, {"step": 1})
    load_checkpoint(module, latest_checkpoint(save_dir))
    hits["checkpoint"] = cpu_adapter.patch_hits()
    return hits


def test_every_patch_is_exercised(tmp_path):
    results = run_distributed(exercise_every_patch, 2, str(tmp_path / "ckpt"))
    final = {name: sum(r["checkpoint"][name] for r in results) for name in cpu_adapter.PATCH_NAMES}
    assert all(count > 0 for count in final.values()), final
    # Where each one fires: the RNG tracker and typed optimizer setup at build time,
    # the dropout forks in the step, synchronize in the checkpoint writer.
    build = {name: sum(r["build"][name] for r in results) for name in cpu_adapter.PATCH_NAMES}
    assert build["current_device"] > 0 and build["optimizer_types"] > 0
    assert build["tensor_cuda"] > 0, "tied embeddings with PP>1 move the output weight"
    assert os.path.isfile(tmp_path / "ckpt" / "latest")


def activation_round_trip(rank, world_size):
    originals = (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.synchronize)
    cpu_adapter.deactivate()
    restored = (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.synchronize)
    cpu_adapter.activate(force=True)
    return originals != restored and torch.empty(2, device="cuda").device.type == "cpu"


def test_deactivate_restores_and_activate_redirects_cuda_factories():
    assert run_distributed(activation_round_trip, 1) == [True]
