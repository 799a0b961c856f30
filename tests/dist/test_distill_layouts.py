"""Online distillation with different teacher and student layouts equals the same-layout run.

On 4 gloo ranks: student TP1/DP4 with teacher TP2/DP2 and TP4/DP1; student TP2/DP2 with
teacher TP1/DP4 and TP4/DP1; student PP2 with teacher PP1; teacher PP2 with student PP1.
For each, the per-token KD losses and the student's gradients (one SGD step, lr = 1) equal
those of a one-rank run with the same teacher checkpoint and global batch - with the dense
exchange (no truncation), the sparse one (top-p-k) and the hidden-state one (the full
distribution, made on the student's ranks from the teacher's hidden states). The layouts run
the fused output layer on both sides (the teacher's kept entries from its hidden states, the
student's loss from its hidden states); the one-rank reference runs the logits path. The
teacher is padded differently from the student (vocab 509 -> 528 vs 512), so vocab shards
overlap irregularly.
"""

import pytest
import torch
import torch.distributed as dist

from _dist import run_distributed
from _models import gather_global_state, rank_microbatches, synthetic_global_batch, tiny_config

TEACHER_SHAPE = [
    "--distill.teacher.model.num_layers=2",
    "--distill.teacher.model.hidden_size=96",
    "--distill.teacher.model.ffn_hidden_size=128",
    "--distill.teacher.model.num_attention_heads=8",
    "--distill.teacher.model.num_query_groups=4",
    "--distill.teacher.model.vocab_size=509",
    "--distill.teacher.model.make_vocab_size_divisible_by=24",
    "--distill.teacher.model.tie_embeddings=false",
]
# fp32 on both sides; the teacher's logits and the student's sums are reduced in another
# order across ranks: ~1e-6 relative. Gradients as in test_parallel_parity.
KD_ATOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
MODES = {
    "dense": [],
    "sparse": ["--distill.truncation=top-0.9-16"],
    "hidden": ["--distill.exchange=hidden"],
}


def save_teacher(rank, world_size, root):
    """A teacher checkpoint (random layout-invariant weights) written at TP=1."""
    from megatron_pd.config import load_config
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.models.checkpoint import CheckpointManager
    from megatron_pd.parallel import topology

    shape = [a.replace("--distill.teacher.model.", "--model.") for a in TEACHER_SHAPE]
    cfg = load_config(None, shape + ["--train.seed=77", "--data.seq_length=32",
                                     "--train.precision=fp32"])
    module = TrainModule(cfg, topology.init_student_groups(1, 1), 509, 1)
    CheckpointManager(root).save(module, 1, {"step": 1})
    return None


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("teacher") / "checkpoints")
    run_distributed(save_teacher, 1, root)
    return root


def distill_run(rank, world_size, student, teacher, checkpoint, fused=True):
    """Per-token KD losses (by global sample), the gradient and the exchanged bytes per
    token, for each exchange mode."""
    from megatron_pd.engine.distill_module import DistillTrainModule
    from megatron_pd.parallel import topology

    out = {}
    for mode, extra in MODES.items():
        cfg = tiny_config(
            *student, *teacher, *TEACHER_SHAPE, *extra,
            f"--distill.teacher.load={checkpoint}", "--distill.loss=forward_kl",
            f"--loss.fused_output_layer={str(fused).lower()}",
            "--distill.alpha.value=0.9", "--distill.tau.value=2.0",
        )
        dp = cfg.validate_for_world(world_size)
        groups = topology.init_student_groups(cfg.parallel.tp, cfg.parallel.pp)
        module = DistillTrainModule(cfg, groups, 509, dp)
        dp_rank = dist.get_rank(groups.dp)
        batches = rank_microbatches(cfg, synthetic_global_batch(cfg, 0), dp_rank, dp)
        module.alpha, module.tau = 0.9, 2.0
        module.capture = []
        module.eval_step(batches)
        per_sample = {}
        if dist.get_rank(groups.tp) == 0:
            per_rank = cfg.train.global_batch_size // dp
            for entry in module.capture:
                first = dp_rank * per_rank + entry["microbatch"] * cfg.train.micro_batch_size
                for b, row in enumerate(entry["kd_loss"].view(cfg.train.micro_batch_size, -1)):
                    per_sample[first + b] = row
        module.capture = None
        before = gather_global_state(module.model)
        module.metrics = False  # a step without the costly metrics reports none of them
        result = module.train_step(batches, lr=1.0, alpha=0.9, tau=2.0)
        assert "teacher_entropy" not in result.extras and "kd_loss" in result.extras
        after = gather_global_state(module.model)
        out[mode] = {
            "kd": per_sample,
            "grads": {k: before[k] - after[k] for k in before},
            "bytes": result.extras["exchange_bytes_per_token"],
        }
    return out


def merge(results):
    merged = {}
    for mode in MODES:
        kd = {}
        for result in results:
            kd.update(result[mode]["kd"])
        merged[mode] = {"kd": torch.stack([kd[i] for i in sorted(kd)]),
                        "grads": results[0][mode]["grads"], "bytes": results[0][mode]["bytes"]}
    return merged


@pytest.fixture(scope="module")
def reference(teacher_checkpoint):
    return merge(run_distributed(distill_run, 1, [], [], teacher_checkpoint, False))


LAYOUTS = {
    "student_tp1dp4_teacher_tp2dp2": (["--parallel.tp=1"], ["--distill.teacher.tp=2"]),
    "student_tp1dp4_teacher_tp4dp1": (["--parallel.tp=1"], ["--distill.teacher.tp=4"]),
    "student_tp2dp2_teacher_tp1dp4": (["--parallel.tp=2"], ["--distill.teacher.tp=1"]),
    "student_tp2dp2_teacher_tp4dp1": (["--parallel.tp=2"], ["--distill.teacher.tp=4"]),
    "student_pp2_teacher_pp1": (["--parallel.pp=2"], []),
    "teacher_pp2_student_pp1": ([], ["--distill.teacher.pp=2"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_rank(layout, teacher_checkpoint, reference):
    student, teacher = LAYOUTS[layout]
    actual = merge(run_distributed(distill_run, 4, student, teacher, teacher_checkpoint))
    if actual["dense"]["bytes"] > 0:  # the full distribution for fewer bytes (H_t < V)
        assert actual["hidden"]["bytes"] < actual["dense"]["bytes"]
    for mode in MODES:
        expected = reference[mode]
        assert expected["kd"].abs().max() > 0
        torch.testing.assert_close(actual[mode]["kd"], expected["kd"], rtol=0, atol=KD_ATOL,
                                   msg=lambda m, mode=mode: f"{mode} per-token KD: {m}")
        for key, grad in expected["grads"].items():
            torch.testing.assert_close(actual[mode]["grads"][key], grad, rtol=GRAD_RTOL,
                                       atol=GRAD_ATOL, msg=lambda m, k=key, mode=mode:
                                       f"{mode} {k}: {m}")
