"""The dense reference loss: gradcheck, torch's own kl_div/cross_entropy, invariants."""

import pytest
import torch
import torch.nn.functional as F

from megatron_pd.loss.reference import reference_loss
from megatron_pd.loss.spec import KD_KINDS, DenseTeacher, LossSpec, SparseTeacher

V, N = 11, 5
EXACT = 1e-12  # float64, same quantities computed two ways


def logits(seed, n=N, v=V, scale=2.0):
    return (
        torch.randn(n, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        * scale
    )


def sparse_topk(teacher_logits, k):
    logp = torch.log_softmax(teacher_logits, -1)
    values, index = logp.topk(k, -1)
    return SparseTeacher(index, values)


CASES = [(kind, "dense", False) for kind in KD_KINDS] + [
    (kind, "sparse", tail)
    for kind in KD_KINDS
    if kind != "mse_logits"
    for tail in (False, True)
    if not (kind == "reverse_kl" and not tail)
]


@pytest.mark.parametrize("kind, teacher_kind, tail", CASES)
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_gradcheck(kind, teacher_kind, tail, tau):
    student = logits(0).requires_grad_()
    t = logits(1)
    teacher = DenseTeacher(t) if teacher_kind == "dense" else sparse_topk(t, 4)
    labels = torch.tensor([0, 3, 10, 5, 7])
    spec = LossSpec(kind=kind, alpha=0.6, tau=tau, tail=tail)
    assert torch.autograd.gradcheck(
        lambda x: reference_loss(x, labels, teacher, spec, V)["loss"], (student,)
    )


@pytest.mark.parametrize("tau, on_student", [(1.0, True), (2.0, True), (0.5, False)])
def test_against_torch_losses(tau, on_student):
    s, t = logits(2), logits(3)
    labels = torch.tensor([1, 2, 3, 4, 5])
    s_t = s / (tau if on_student else 1.0)
    log_p, log_t = F.log_softmax(s_t, -1), F.log_softmax(t / tau, -1)
    expected = {
        "forward_kl": F.kl_div(log_p, log_t, log_target=True, reduction="none").sum(-1),
        "reverse_kl": F.kl_div(log_t, log_p, log_target=True, reduction="none").sum(-1),
        "soft_ce": F.cross_entropy(s_t, log_t.exp(), reduction="none"),
        "mse_probs": ((log_p.exp() - log_t.exp()) ** 2).sum(-1),
        "mse_logits": F.mse_loss(s_t, t / tau, reduction="none").mean(-1),
    }
    for kind, value in expected.items():
        spec = LossSpec(kind=kind, alpha=1.0, tau=tau, tau_on_student=on_student)
        actual = reference_loss(s, labels, DenseTeacher(t), spec, V)
        torch.testing.assert_close(actual["kd"], value, rtol=0, atol=EXACT)
        torch.testing.assert_close(
            actual["lm"], F.cross_entropy(s, labels, reduction="none"), rtol=0, atol=EXACT
        )


def test_jsd_definition():
    s, t = logits(4), logits(5)
    beta = 0.3
    P, T = F.softmax(s, -1), F.softmax(t, -1)
    M = beta * T + (1 - beta) * P
    expected = beta * F.kl_div(M.log(), T, reduction="none").sum(-1) + (1 - beta) * F.kl_div(
        M.log(), P, reduction="none"
    ).sum(-1)
    spec = LossSpec(kind="jsd", alpha=1.0, jsd_beta=beta)
    torch.testing.assert_close(
        reference_loss(s, None, DenseTeacher(t), spec, V)["kd"], expected, rtol=0, atol=EXACT
    )


def test_invariants():
    s, t = logits(6), logits(7)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        same = reference_loss(s, None, DenseTeacher(s), LossSpec(kind=kind), V)["kd"]
        assert same.abs().max() < 1e-12
        assert (reference_loss(s, None, DenseTeacher(t), LossSpec(kind=kind), V)["kd"] >= 0).all()
    soft = reference_loss(s, None, DenseTeacher(t), LossSpec(kind="soft_ce", tau=2.0), V)["kd"]
    fkl = reference_loss(s, None, DenseTeacher(t), LossSpec(kind="forward_kl", tau=2.0), V)["kd"]
    T = F.softmax(t / 2.0, -1)
    entropy = -(T * T.log()).sum(-1)
    torch.testing.assert_close(soft - fkl, entropy, rtol=0, atol=EXACT)


@pytest.mark.parametrize("kind", ["soft_ce", "forward_kl", "jsd", "mse_probs"])
def test_top_v_sparse_equals_dense(kind):
    s, t = logits(8), logits(9)
    spec = LossSpec(kind=kind, alpha=1.0, tau=1.5)
    dense = reference_loss(s, None, DenseTeacher(t), spec, V)["kd"]
    sparse = reference_loss(s, None, sparse_topk(t, V), spec, V)["kd"]
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-10)


def test_padding_columns_and_ignore_index():
    s, t = logits(10, v=V + 5), logits(11, v=V + 5)
    s[:, V:] = 100.0  # padded columns: must not count however large
    labels = torch.tensor([0, -100, 2, 3, 4])
    out = reference_loss(s, labels, DenseTeacher(t), LossSpec(kind="forward_kl", alpha=0.5), V)
    clean = reference_loss(
        s[:, :V], labels, DenseTeacher(t[:, :V]), LossSpec(kind="forward_kl", alpha=0.5), V
    )
    torch.testing.assert_close(out["loss"], clean["loss"], rtol=0, atol=EXACT)
    assert out["loss"][1] == 0


def test_sparse_tail_ghost_category():
    s, t = logits(12), logits(13)
    teacher = sparse_topk(t, 3)
    spec = LossSpec(kind="forward_kl", alpha=1.0, tail=True)
    kd = reference_loss(s, None, teacher, spec, V)["kd"]
    P, T = F.softmax(s, -1), F.softmax(t, -1)
    idx = teacher.indices
    P_k, T_k = P.gather(1, idx), T.gather(1, idx)
    r, G = 1 - T_k.sum(-1), 1 - P_k.sum(-1)
    expected = (T_k * (T_k / P_k).log()).sum(-1) + r * (r / G).log()
    torch.testing.assert_close(kd, expected, rtol=0, atol=EXACT)


def test_undefined_combinations_are_errors():
    teacher = sparse_topk(logits(14), 3)
    with pytest.raises(ValueError, match="reverse_kl with a sparse teacher needs tail=True"):
        reference_loss(logits(15), None, teacher, LossSpec(kind="reverse_kl"), V)
    with pytest.raises(ValueError, match="mse_logits needs a dense teacher"):
        reference_loss(logits(15), None, teacher, LossSpec(kind="mse_logits"), V)
    with pytest.raises(ValueError, match="alpha=0.5 needs a teacher"):
        reference_loss(logits(15), torch.zeros(N, dtype=torch.long), None, LossSpec(alpha=0.5), V)
