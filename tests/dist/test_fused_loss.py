"""The fused vocab-parallel loss equals the dense reference on 1, 2 and 4 gloo ranks.

Loss per token AND each rank's gradient against its slice of the reference gradient, for every
loss kind, dense and sparse teachers (with and without the tail), tau in {0.5, 1, 2}, alpha in
{0, 0.9, 1}; a prime true vocabulary padded so the last shard has padding columns, ignored
tokens, a sparse row with no kept entry, and a chunk size that does not divide the tokens.
"""

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

from megatron_pd.loss.reference import reference_loss
from megatron_pd.loss.spec import KD_KINDS, DenseTeacher, LossSpec, SparseTeacher
from megatron_pd.loss.vocab_parallel import fused_distill_loss
from megatron_pd.parallel.vocab import VocabInfo

TRUE_VOCAB, PADDED_VOCAB, TOKENS, KEEP, CHUNK = 97, 104, 13, 8, 4
# fp32 fused path vs float64 reference on O(1) losses: rounding of log-sum-exp and of
# products over ~100 columns stays below 1e-5; real mistakes are > 1e-3.
ATOL = 2e-5

TEACHERS = [("dense", False), ("sparse", False), ("sparse", True)]
CASES = [
    (kind, teacher, tail, tau, alpha)
    for kind in KD_KINDS
    for teacher, tail in TEACHERS
    if not (teacher == "sparse" and kind == "mse_logits")
    and not (teacher == "sparse" and kind == "reverse_kl" and not tail)
    for tau in (0.5, 1.0, 2.0)
    for alpha in (0.0, 0.9, 1.0)
]


def global_inputs():
    g = torch.Generator().manual_seed(11)
    student = torch.randn(TOKENS, PADDED_VOCAB, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(TOKENS, PADDED_VOCAB, generator=g, dtype=torch.float64) * 3
    student[:, TRUE_VOCAB:] = 50.0  # padding columns: large, and must be ignored
    labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=g)
    labels[[2, 9]] = -100
    logp = torch.log_softmax(teacher[:, :TRUE_VOCAB], -1)
    values, index = logp.topk(KEEP, -1)
    index[4, 5:] = -1  # fewer kept entries
    index[7, :] = -1  # no kept entry at all
    values = torch.where(index >= 0, values, torch.zeros_like(values))
    for row in (0, 1, 3, 5):  # the student's top-1 is the teacher's on a few tokens
        student[row, index[row, 0]] = 30.0  # confident: almost no mass outside the kept set
    return student, teacher, labels, SparseTeacher(index, values)


def make_teacher(teacher_kind, teacher_logits, sparse, columns=slice(None)):
    if teacher_kind == "dense":
        return DenseTeacher(teacher_logits[:, columns])
    return sparse


def fused_cases(rank, world_size, cases):
    student, teacher_logits, labels, sparse = global_inputs()
    width = PADDED_VOCAB // world_size
    columns = slice(rank * width, (rank + 1) * width)
    vocab = VocabInfo(TRUE_VOCAB, PADDED_VOCAB, world_size, rank)
    sparse32 = SparseTeacher(sparse.indices, sparse.logprobs.float())
    weights = torch.linspace(0.5, 1.5, TOKENS)
    results = []
    for kind, teacher_kind, tail, tau, alpha in cases:
        spec = LossSpec(kind=kind, alpha=alpha, tau=tau, tail=tail)
        local = student[:, columns].float().clone().requires_grad_()
        teacher = make_teacher(teacher_kind, teacher_logits.float(), sparse32, columns)
        log = []
        out = fused_distill_loss(local, labels, teacher, spec, vocab, dist.group.WORLD,
                                 chunk_tokens=CHUNK, collectives=log)
        (out["loss"] * weights).sum().backward()
        results.append((out["loss"].detach(), local.grad, log))
    return results


def reference_case(kind, teacher_kind, tail, tau, alpha):
    student, teacher_logits, labels, sparse = global_inputs()
    x = student.clone().requires_grad_()
    spec = LossSpec(kind=kind, alpha=alpha, tau=tau, tail=tail)
    out = reference_loss(x, labels, make_teacher(teacher_kind, teacher_logits, sparse), spec,
                         TRUE_VOCAB)
    (out["loss"] * torch.linspace(0.5, 1.5, TOKENS, dtype=torch.float64)).sum().backward()
    return out["loss"].detach(), x.grad


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_fused_equals_reference(world_size):
    per_rank = run_distributed(fused_cases, world_size, CASES)
    width = PADDED_VOCAB // world_size
    for index, case in enumerate(CASES):
        expected_loss, expected_grad = reference_case(*case)
        for rank in range(world_size):
            loss, grad, log = per_rank[rank][index]
            torch.testing.assert_close(loss.double(), expected_loss, rtol=0, atol=ATOL,
                                       msg=lambda m, c=case: f"{c} loss: {m}")
            torch.testing.assert_close(
                grad.double(), expected_grad[:, rank * width:(rank + 1) * width], rtol=0,
                atol=ATOL, msg=lambda m, c=case, r=rank: f"{c} rank {r} grad: {m}")
            assert log == (["all_gather", "all_reduce"] if case[0] == "jsd" else ["all_gather"])


def invariants(rank, world_size):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_pd.parallel import topology

    topology.init_student_groups(world_size, 1)
    student, teacher_logits, labels, sparse = global_inputs()
    width = PADDED_VOCAB // world_size
    columns = slice(rank * width, (rank + 1) * width)
    vocab = VocabInfo(TRUE_VOCAB, PADDED_VOCAB, world_size, rank)
    group = dist.group.WORLD
    local = student[:, columns].float()
    out = {}
    # student == teacher: zero KL, zero gradient
    x = local.clone().requires_grad_()
    same = fused_distill_loss(x, None, DenseTeacher(local.clone()),
                              LossSpec(kind="forward_kl", tau=2.0), vocab, group)
    same["loss"].sum().backward()
    out["same_kd"], out["same_grad"] = same["kd"], x.grad
    # soft CE - forward KL = teacher entropy (which the loss also reports)
    teacher = DenseTeacher(teacher_logits[:, columns].float())
    soft = fused_distill_loss(local, None, teacher, LossSpec(kind="soft_ce"), vocab, group)
    fkl = fused_distill_loss(local, None, teacher, LossSpec(kind="forward_kl"), vocab, group)
    out["ce_minus_kl"], out["entropy"] = soft["kd"] - fkl["kd"], fkl["teacher_entropy"]
    out["kl"] = fkl["kd"]
    # top-k with k = V equals the dense teacher
    logp = torch.log_softmax(teacher_logits[:, :TRUE_VOCAB].float(), -1)
    full = SparseTeacher(torch.arange(TRUE_VOCAB).expand(TOKENS, -1).contiguous(), logp)
    out["top_v"] = fused_distill_loss(local, None, full, LossSpec(kind="forward_kl"), vocab,
                                      group)["kd"]
    # alpha = 0 equals megatron-core's vocab_parallel_cross_entropy (no padding there)
    unpadded = VocabInfo(PADDED_VOCAB, PADDED_VOCAB, world_size, rank)
    safe = labels.clamp_min(0)
    ours = fused_distill_loss(local, safe, None, LossSpec(alpha=0.0), unpadded, group)["loss"]
    theirs = vocab_parallel_cross_entropy(local[:, None, :].clone(), safe[:, None])[:, 0]
    out["ce_ours"], out["ce_megatron"] = ours, theirs
    # bf16 logits: gradient comes back in bf16
    y = local.bfloat16().requires_grad_()
    fused_distill_loss(y, labels, teacher, LossSpec(alpha=0.5), vocab, group)["loss"].sum(
        ).backward()
    out["bf16_grad_dtype"] = y.grad.dtype
    # every token ignored: zero loss and zero gradient
    z = local.clone().requires_grad_()
    none = fused_distill_loss(z, torch.full_like(labels, -100), teacher, LossSpec(alpha=0.5),
                              vocab, group)
    none["loss"].sum().backward()
    out["ignored_loss"], out["ignored_grad"] = none["loss"], z.grad
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_invariants(world_size):
    for out in run_distributed(invariants, world_size):
        assert out["same_kd"].abs().max() < 1e-5
        assert out["same_grad"].abs().max() < 1e-6
        assert (out["kl"] >= 0).all()
        torch.testing.assert_close(out["ce_minus_kl"], out["entropy"], rtol=0, atol=ATOL)
        torch.testing.assert_close(out["top_v"], out["kl"], rtol=0, atol=ATOL)
        torch.testing.assert_close(out["ce_ours"], out["ce_megatron"], rtol=0, atol=ATOL)
        assert out["bf16_grad_dtype"] == torch.bfloat16
        assert out["ignored_loss"].abs().max() == 0 and out["ignored_grad"].abs().max() == 0


def saved_tensors(rank, world_size):
    """Shapes of everything the autograd graph keeps for backward."""
    student, teacher_logits, labels, _ = global_inputs()
    local = student[:, :PADDED_VOCAB].float().clone().requires_grad_()
    shapes = []

    def pack(tensor):
        shapes.append((tuple(tensor.shape), tensor.data_ptr() == local.data_ptr()))
        return tensor

    vocab = VocabInfo(TRUE_VOCAB, PADDED_VOCAB, 1, 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_distill_loss(local, labels, DenseTeacher(teacher_logits.float()),
                           LossSpec(kind="reverse_kl", alpha=0.5), vocab, dist.group.WORLD,
                           chunk_tokens=CHUNK)
    return shapes


def test_only_per_token_statistics_are_saved():
    shapes = run_distributed(saved_tensors, 1)[0]
    full = [(shape, is_input) for shape, is_input in shapes if len(shape) == 2]
    # The only [N, V] tensors kept are the inputs themselves (student by reference, teacher).
    assert all(shape == (TOKENS, PADDED_VOCAB) for shape, _ in full)
    assert sum(is_input for _, is_input in full) == 1 and len(full) == 2
    assert all(len(shape) <= 1 for shape, _ in shapes if (shape, False) not in full
               and len(shape) != 2)


def three_implementations(rank, world_size):
    from megatron_pd.loss.objective import distillation_loss

    student, teacher_logits, labels, sparse = global_inputs()
    width = PADDED_VOCAB // world_size
    columns = slice(rank * width, (rank + 1) * width)
    vocab = VocabInfo(TRUE_VOCAB, PADDED_VOCAB, world_size, rank)
    results = {}
    for teacher_kind in ("dense", "sparse"):
        teacher = (DenseTeacher(teacher_logits[:, columns].float()) if teacher_kind == "dense"
                   else SparseTeacher(sparse.indices, sparse.logprobs.float()))
        for impl in ("reference", "torch", "triton"):
            x = student[:, columns].float().clone().requires_grad_()
            out = distillation_loss(x, labels, teacher, LossSpec(kind="forward_kl", alpha=0.9,
                                                                 tau=2.0), vocab,
                                    dist.group.WORLD, impl=impl)
            out["loss"].sum().backward()
            results[teacher_kind, impl] = {k: v.detach() for k, v in out.items()} | {
                "grad": x.grad}
    return results


def test_three_implementations_one_signature():
    for result in run_distributed(three_implementations, 2):
        for teacher_kind in ("dense", "sparse"):
            expected = result[teacher_kind, "reference"]
            for impl in ("torch", "triton"):
                actual = result[teacher_kind, impl]
                for key in ("loss", "lm", "kd", "grad", "teacher_entropy", "kept"):
                    torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=ATOL,
                                               msg=lambda m, k=key, i=impl: f"{i} {k}: {m}")
                assert torch.equal(actual["agree"], expected["agree"])
            assert expected["agree"][[0, 1, 3, 5]].eq(1).all()
