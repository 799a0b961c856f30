"""Online distillation: frozen teacher, loading errors, alpha = 0, teacher = student, resume."""

import os

import pytest
import torch
import torch.distributed as dist

from _dist import run_distributed
from _models import gather_global_state, rank_microbatches, synthetic_global_batch, tiny_config

STUDENT_AS_TEACHER = [  # the student's own shape, so its init can serve as a teacher
    "--distill.teacher.model.num_layers=4",
    "--distill.teacher.model.hidden_size=64",
    "--distill.teacher.model.ffn_hidden_size=96",
    "--distill.teacher.model.num_attention_heads=8",
    "--distill.teacher.model.num_query_groups=4",
    "--distill.teacher.model.vocab_size=509",
    "--distill.teacher.model.make_vocab_size_divisible_by=16",
]


def save_student_init(rank, world_size, root, fingerprint):
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.models.checkpoint import CheckpointManager
    from megatron_pd.parallel import topology

    cfg = tiny_config()
    module = TrainModule(cfg, topology.init_student_groups(1, 1), 509, 1)
    CheckpointManager(root).save(module, 0, {"step": 0, "tokenizer_fingerprint": fingerprint})


@pytest.fixture(scope="module")
def student_init_checkpoint(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("student_init") / "checkpoints")
    run_distributed(save_student_init, 1, root, "tok-A")
    return root


def build(cfg_args, world_size, fingerprint="tok-A"):
    from megatron_pd.engine.distill_module import DistillTrainModule
    from megatron_pd.parallel import topology

    cfg = tiny_config(*cfg_args)
    dp = cfg.validate_for_world(world_size)
    groups = topology.init_student_groups(cfg.parallel.tp, cfg.parallel.pp)
    return cfg, groups, DistillTrainModule(cfg, groups, 509, dp, fingerprint)


def frozen_properties(rank, world_size, checkpoint, save_dir):
    from megatron_pd.models.checkpoint import CheckpointManager

    cfg, groups, module = build(["--distill.teacher.load=" + checkpoint, *STUDENT_AS_TEACHER,
                                 "--distill.teacher.tp=2", "--distill.alpha.value=0.5"],
                                world_size)
    teacher_params = list(module.teacher.parameters())
    before = [p.detach().clone() for p in teacher_params]
    ids = {id(p) for p in teacher_params}
    optimizer_ids = {id(p) for g in module.optimizer.param_groups for p in g["params"]}
    ddp_ids = {id(p) for p in module.model.parameters()}
    batches = rank_microbatches(cfg, synthetic_global_batch(cfg, 0), dist.get_rank(groups.dp),
                                2)
    result = module.train_step(batches, lr=1.0, alpha=0.5, tau=1.0)
    manager = CheckpointManager(save_dir)
    manager.save(module, 1, {"step": 1})
    return {
        "requires_grad": any(p.requires_grad for p in teacher_params),
        "training": module.teacher.model.training,
        "in_optimizer": bool(ids & optimizer_ids),
        "in_ddp": bool(ids & ddp_ids),
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, teacher_params)),
        "grads": any(p.grad is not None for p in teacher_params),
        "kd": result.extras["kd_loss"],
        "student_params": module.num_parameters(),
    }


def test_teacher_is_frozen_by_construction(student_init_checkpoint, tmp_path):
    from megatron.core import dist_checkpointing

    save_dir = str(tmp_path / "student_ckpt")
    results = run_distributed(frozen_properties, 2, student_init_checkpoint, save_dir)
    for r in results:
        assert not r["requires_grad"] and not r["training"]
        assert not r["in_optimizer"] and not r["in_ddp"]
        assert r["unchanged"] and not r["grads"]
    # The student's checkpoint holds the student only: its parameters, no second model.
    metadata = dist_checkpointing.load_tensors_metadata(os.path.join(save_dir, "iter_0000001"))
    model_numel = sum(int(torch.Size(m.global_shape).numel()) for k, m in metadata.items()
                      if not k.startswith(("optimizer", "rng")))
    assert model_numel == results[0]["student_params"]


def teacher_equals_student(rank, world_size, checkpoint):
    cfg, groups, module = build(["--distill.teacher.load=" + checkpoint, *STUDENT_AS_TEACHER,
                                 "--distill.loss=forward_kl"], world_size)
    batches = rank_microbatches(cfg, synthetic_global_batch(cfg, 0), dist.get_rank(groups.dp),
                                world_size)
    module.alpha, module.tau = 1.0, 2.0
    module.capture = []
    module.eval_step(batches)
    return torch.cat([c["kd_loss"] for c in module.capture])


def test_teacher_equal_to_student_gives_zero_kd(student_init_checkpoint):
    for kd in run_distributed(teacher_equals_student, 2, student_init_checkpoint):
        assert kd.abs().max() < 1e-5


def alpha_zero_vs_lm(rank, world_size, checkpoint):
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.parallel import topology

    out = {}
    cfg = tiny_config()
    batches = rank_microbatches(cfg, synthetic_global_batch(cfg, 0), 0, 1)
    lm = TrainModule(cfg, topology.init_student_groups(1, 1), 509, 1)
    before = gather_global_state(lm.model)
    out["lm_loss"] = lm.train_step(batches, lr=1.0).loss
    out["lm_grads"] = {k: before[k] - v for k, v in gather_global_state(lm.model).items()}
    _, _, pd = build(["--distill.teacher.load=" + checkpoint, *STUDENT_AS_TEACHER,
                      "--distill.alpha.value=0.0", "--distill.tau.value=2.0"], world_size)
    before = gather_global_state(pd.model)
    out["pd_loss"] = pd.train_step(batches, lr=1.0, alpha=0.0, tau=2.0).loss
    out["pd_grads"] = {k: before[k] - v for k, v in gather_global_state(pd.model).items()}
    return out


def test_alpha_zero_reproduces_lm_training(student_init_checkpoint):
    out = run_distributed(alpha_zero_vs_lm, 1, student_init_checkpoint)[0]
    assert out["pd_loss"] == out["lm_loss"]
    for key, grad in out["lm_grads"].items():
        assert torch.equal(out["pd_grads"][key], grad), key


def bad_teacher(rank, world_size, args, fingerprint):
    try:
        build(args, world_size, fingerprint)
    except ValueError as err:
        return str(err)
    return None


def test_missing_or_mismatched_teacher_fails_clearly(student_init_checkpoint, tmp_path):
    missing = run_distributed(bad_teacher, 1, ["--distill.teacher.load=" + str(tmp_path / "x"),
                                               *STUDENT_AS_TEACHER], "tok-A")[0]
    assert "distill.teacher.load=" in missing and "does not exist" in missing
    wrong_shape = STUDENT_AS_TEACHER + ["--distill.teacher.model.hidden_size=32"]
    mismatch = run_distributed(bad_teacher, 1, ["--distill.teacher.load="
                                                + student_init_checkpoint, *wrong_shape],
                               "tok-A")[0]
    assert "does not fit the teacher model" in mismatch
    tokenizer = run_distributed(bad_teacher, 1, ["--distill.teacher.load="
                                                 + student_init_checkpoint,
                                                 *STUDENT_AS_TEACHER], "tok-B")[0]
    assert "was trained with tokenizer tok-A, the student's data.tokenizer_model is tok-B" \
        in tokenizer
    no_shape = run_distributed(bad_teacher, 1, ["--distill.teacher.load="
                                                + student_init_checkpoint], "tok-A")[0]
    assert "distill.teacher.model is not set and no config.yaml" in no_shape


def compiled_vs_torch(rank, world_size, checkpoint):
    from megatron_pd.loss import compiled_kernels

    out = {"available": compiled_kernels.compiled_available("cpu")[0], "kernels": set()}
    run = compiled_kernels._run  # (a forked worker: the patch ends with it)

    def counted(kernel, *args, **static):
        out["kernels"].add(kernel.__name__)
        return run(kernel, *args, **static)

    compiled_kernels._run = counted
    for impl in ("torch", "compiled") if out["available"] else ():
        cfg, groups, module = build(
            ["--distill.teacher.load=" + checkpoint, *STUDENT_AS_TEACHER,
             "--distill.alpha.value=0.5", "--distill.tau.value=2.0",
             f"--loss.implementation={impl}"],
            world_size,
        )
        batches = rank_microbatches(cfg, synthetic_global_batch(cfg, 0), 0, 2)
        before = gather_global_state(module.model)
        result = module.train_step(batches, lr=1.0, alpha=0.5, tau=2.0)
        after = gather_global_state(module.model)
        out[impl] = (result.loss, result.extras["kd_loss"],
                     {k: before[k] - v for k, v in after.items()})
    return out


def test_compiled_loss_trains_like_the_torch_loss(student_init_checkpoint):
    """loss.implementation=compiled through the engine (fused output layer, online teacher):
    one step's loss, KD and update equal the torch implementation's."""
    out = run_distributed(compiled_vs_torch, 1, student_init_checkpoint)[0]
    if not out["available"]:
        pytest.skip("no C++ compiler for inductor")
    assert out["kernels"] == {"_stats_kernel", "_grad_kernel"}  # the compiled path ran
    (loss_t, kd_t, step_t), (loss_c, kd_c, step_c) = out["torch"], out["compiled"]
    assert abs(loss_c - loss_t) < 1e-5 and abs(float(kd_c) - float(kd_t)) < 1e-5
    for key, delta in step_t.items():
        torch.testing.assert_close(step_c[key], delta, rtol=1e-4, atol=1e-6, msg=key)
