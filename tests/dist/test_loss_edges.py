"""The loss and the truncation at their edges, each against a float64 computation.

Exact top-k (top-1.0-k keeps k entries even for a confident teacher), the teacher's tail mass
carried exactly (r down to 1e-22, through truncation, exchange and loss), ties broken by the
lowest token id at any TP size, the k_cap of top-p-inf announced, -inf teacher logits,
strided inputs to the Triton kernels, and bad input: each a clear ValueError. Every case runs
on the reference, torch and Triton (interpreter) implementations at TP = 1 and 2.
"""

import math
import warnings

import pytest
import torch
import torch.distributed as dist

from _dist import run_distributed
from megatron_pd.logits.truncation import (
    TruncationCapWarning,
    TruncationSpec,
    retruncate,
    truncate_dense,
    truncate_vocab_parallel,
)
from megatron_pd.loss import triton_kernels
from megatron_pd.loss.objective import distillation_loss
from megatron_pd.loss.reference import reference_loss
from megatron_pd.loss.spec import DenseTeacher, LossSpec, SparseTeacher
from megatron_pd.parallel.vocab import VocabInfo

TRUE_VOCAB, PADDED, TOKENS = 211, 224, 8
IMPLS = ["reference", "torch"] + (["triton"] if triton_kernels.triton_available()[0] else [])
# fp32 fused paths vs float64 on O(1) losses: log-sum-exp rounding over ~200 columns < 1e-5.
ATOL = 2e-5
# Losses of O(50) nats (reverse KL against a tail of 1e-22): fp32 relative rounding.
RTOL_LARGE = 1e-6
# log r from fp32 statistics merged in float64: fp32 relative error of each summand.
LOG_TAIL_RTOL = 1e-5


def columns(rank, world_size):
    width = PADDED // world_size
    return slice(rank * width, (rank + 1) * width)


def vocab_of(rank, world_size):
    return VocabInfo(TRUE_VOCAB, PADDED, world_size, rank)


def confident_logits():
    """One dominant entry per row, gaps from 28 to 56 nats: tail mass r from 1e-10 to 1e-22."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(TOKENS, PADDED, generator=g, dtype=torch.float64)
    logits[:, TRUE_VOCAB:] = 1e4  # padding: never counts
    gaps = torch.linspace(28.0, 56.0, TOKENS, dtype=torch.float64)
    top = (torch.arange(TOKENS) * 23) % TRUE_VOCAB
    logits[torch.arange(TOKENS), top] += gaps
    return logits.float(), top


def expected_top_k(logits, k):
    """The k most probable ids, ties by lowest id (plain Python sort), and exact log r."""
    rows = logits[:, :TRUE_VOCAB].double()
    ids, log_tails = [], []
    for row in rows:
        order = sorted(range(TRUE_VOCAB), key=lambda j: (-row[j].item(), j))
        kept = [j for j in order[:k] if row[j] > -math.inf]
        dropped = torch.tensor(order[len(kept):], dtype=torch.long)
        ids.append(kept)
        lse = torch.logsumexp(row, 0)
        log_tails.append((torch.logsumexp(row[dropped], 0) - lse).item() if len(dropped)
                         else -math.inf)
    return ids, torch.tensor(log_tails, dtype=torch.float64)


def float64_sparse_teacher(logits, kept_ids, slots):
    """SparseTeacher in float64 with its exact tail mass, built from the dense logits."""
    rows = logits[:, :TRUE_VOCAB].double()
    logp = torch.log_softmax(rows, -1)
    indices = torch.full((len(kept_ids), slots), -1, dtype=torch.long)
    values = torch.zeros(len(kept_ids), slots, dtype=torch.float64)
    log_tail = torch.empty(len(kept_ids), dtype=torch.float64)
    for n, ids in enumerate(kept_ids):
        indices[n, : len(ids)] = torch.tensor(ids)
        values[n, : len(ids)] = logp[n, ids]
        dropped = torch.ones(TRUE_VOCAB, dtype=torch.bool)
        dropped[ids] = False
        log_tail[n] = torch.logsumexp(logp[n][dropped], 0) if dropped.any() else -math.inf
    return SparseTeacher(indices, values, log_tail)


# ------------------------------------------------------------------ 1. top-1.0-k is top-k
def truncate_all(rank, world_size, logits, names, min_k=1, k_cap=1024):
    shard = logits[:, columns(rank, world_size)]
    return [
        truncate_vocab_parallel(shard, vocab_of(rank, world_size),
                                TruncationSpec.parse(n, min_k=min_k, k_cap=k_cap),
                                dist.group.WORLD, chunk_tokens=3)
        for n in names
    ]


@pytest.mark.parametrize("world_size", [1, 2])
def test_top_1_k_keeps_exactly_k_for_a_confident_teacher(world_size):
    logits, _ = confident_logits()
    expected_ids, expected_log_tail = expected_top_k(logits, 50)
    dense = truncate_dense(logits, TRUE_VOCAB, TruncationSpec.parse("top-1.0-50"))
    parallel = run_distributed(truncate_all, world_size, logits, ["top-1.0-50"])
    for actual in [dense] + [r[0] for r in parallel]:
        assert (actual.kept_counts() == 50).all()
        for n in range(TOKENS):
            assert actual.indices[n].tolist() == expected_ids[n]
        torch.testing.assert_close(actual.log_tail.double(), expected_log_tail,
                                   rtol=LOG_TAIL_RTOL, atol=0)


def loss_cases(rank, world_size, student, teacher, specs, labels, impls, check_inputs=True):
    """Per spec and implementation: (loss, this rank's gradient) on this rank's columns."""
    cols = columns(rank, world_size)
    vocab = vocab_of(rank, world_size)
    if isinstance(teacher, DenseTeacher):
        teacher = DenseTeacher(teacher.logits[:, cols])
    out = []
    for spec in specs:
        for impl in impls:
            x = student[:, cols].clone().requires_grad_()
            result = distillation_loss(x, labels, teacher, spec, vocab, dist.group.WORLD,
                                       impl=impl, check_inputs=check_inputs)
            result["loss"].sum().backward()
            out.append((spec, impl, result["loss"].detach(), x.grad))
    return out


def expected_loss(student, labels, teacher, spec):
    x = student.double().requires_grad_()
    out = reference_loss(x, labels, teacher, spec, TRUE_VOCAB)
    out["loss"].sum().backward()
    return out["loss"].detach(), x.grad


def check_against(per_rank, world_size, student, labels, teacher64, rtol=0.0, atol=ATOL):
    for rank, rank_results in enumerate(per_rank):
        for spec, impl, loss, grad in rank_results:
            want_loss, want_grad = expected_loss(student, labels, teacher64, spec)
            where = f"{spec.kind} tau={spec.tau} tail={spec.tail} {impl} rank {rank}"
            torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=atol,
                                       msg=lambda m, w=where: f"{w} loss: {m}")
            torch.testing.assert_close(grad.double(), want_grad[:, columns(rank, world_size)],
                                       rtol=rtol, atol=atol,
                                       msg=lambda m, w=where: f"{w} grad: {m}")


def student_logits(seed=8):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(TOKENS, PADDED, generator=g) * 2
    student[:, TRUE_VOCAB:] = 40.0
    return student


@pytest.mark.parametrize("world_size", [1, 2])
def test_top_k_loss_at_high_tau_equals_true_top_k(world_size):
    logits, _ = confident_logits()
    spec_names = ["top-1.0-50"]
    teacher = run_distributed(truncate_all, world_size, logits, spec_names)[0][0]
    expected_ids, _ = expected_top_k(logits, 50)
    teacher64 = float64_sparse_teacher(logits, expected_ids, 50)
    student = student_logits()
    labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1))
    specs = [LossSpec(kind="forward_kl", alpha=0.9, tau=tau) for tau in (2.0, 5.0)]
    per_rank = run_distributed(loss_cases, world_size, student, teacher, specs, labels, IMPLS)
    check_against(per_rank, world_size, student, labels, teacher64)


# ------------------------------------------------------------------ 2. the exact tail mass
@pytest.mark.parametrize("world_size", [1, 2])
def test_tail_mass_of_a_confident_teacher_is_exact(world_size):
    logits, top = confident_logits()
    expected_ids, expected_log_tail = expected_top_k(logits, 1)
    assert all(ids == [t] for ids, t in zip(expected_ids, top.tolist()))
    assert -53.0 < expected_log_tail.min() and expected_log_tail.max() < -21.0  # 1e-10..1e-23
    results = run_distributed(truncate_all, world_size, logits, ["top-0.95-50"])
    dense = truncate_dense(logits, TRUE_VOCAB, TruncationSpec.parse("top-0.95-50"))
    for actual in [dense] + [r[0] for r in results]:
        assert (actual.kept_counts() == 1).all()
        torch.testing.assert_close(actual.log_tail.double(), expected_log_tail,
                                   rtol=LOG_TAIL_RTOL, atol=0)
        # the kept log-prob itself is -r, not 0 (log1p of the mass below the maximum)
        torch.testing.assert_close(-actual.logprobs[:, 0].double(), expected_log_tail.exp(),
                                   rtol=1e-5, atol=0)


@pytest.mark.parametrize("world_size", [1, 2])
def test_reverse_kl_with_tail_against_a_confident_teacher(world_size):
    logits, _ = confident_logits()
    expected_ids, _ = expected_top_k(logits, 1)
    teacher64 = float64_sparse_teacher(logits, expected_ids, 50)
    teacher = run_distributed(truncate_all, world_size, logits, ["top-0.95-50"])[0][0]
    # without the carried log r (a hand-made teacher): derived from the kept log-probs
    derived = SparseTeacher(teacher.indices, teacher.logprobs)
    student = student_logits()
    labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(2))
    specs = [LossSpec(kind=k, alpha=a, tau=tau, tail=True)
             for k in ("reverse_kl", "forward_kl", "jsd", "mse_probs")
             for a, tau in ((1.0, 1.0), (0.7, 2.0))]
    want = expected_loss(student, labels, teacher64, specs[0])[0]
    assert 20.0 < want.min() and want.max() < 60.0  # 24-50 nats of truth, not 87.5 of a clamp
    for given in (teacher, derived):
        per_rank = run_distributed(loss_cases, world_size, student, given, specs, labels, IMPLS)
        check_against(per_rank, world_size, student, labels, teacher64, rtol=RTOL_LARGE)


def exchange_tail(rank, world_size, indices, logprobs, log_tail):
    from megatron_pd.parallel.exchange import ExchangePlan, exchange_sparse
    from megatron_pd.parallel.topology import Layout

    plan = ExchangePlan(world_size, Layout(world_size, 1, 1), Layout(world_size, 2, 1),
                        TRUE_VOCAB, PADDED, PADDED, "sparse")
    batch = indices.shape[0] // 2
    return exchange_sparse(plan, rank, indices, logprobs, batch, indices.shape[1],
                           indices.shape[2], torch.device("cpu"), log_tail=log_tail)


def test_sparse_exchange_carries_the_tail_mass():
    g = torch.Generator().manual_seed(4)
    indices = torch.randint(0, TRUE_VOCAB, (4, 3, 5), generator=g)
    logprobs = -torch.rand(4, 3, 5, generator=g)
    log_tail = -torch.rand(4, 3, generator=g) * 50
    results = run_distributed(exchange_tail, 2, indices, logprobs, log_tail)
    for rank, (ids, values, tail) in enumerate(results):
        own = slice(rank * 2, rank * 2 + 2)
        assert torch.equal(ids.long(), indices[own])
        assert torch.equal(values, logprobs[own])
        assert torch.equal(tail, log_tail[own])


# ------------------------------------------------------------------ 3. ties, any layout
def tied_logits():
    """Integer-valued logits: every row is full of ties (as bf16 teachers often are)."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randint(0, 4, (TOKENS, PADDED), generator=g).float()
    logits[:, TRUE_VOCAB:] = 9.0
    return logits


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ties_keep_the_lowest_ids_at_any_tp(world_size):
    logits = tied_logits()
    names = ["top-1.0-20", "top-0.5-30", "top-0.95-7"]
    results = run_distributed(truncate_all, world_size, logits, names, min_k=3)
    for index, name in enumerate(names):
        spec = TruncationSpec.parse(name, min_k=3)
        dense = truncate_dense(logits, TRUE_VOCAB, spec)
        order = [sorted(range(TRUE_VOCAB), key=lambda j, r=row: (-r[j].item(), j))
                 for row in logits]
        for n in range(TOKENS):
            count = int(dense.kept_counts()[n])
            assert dense.indices[n, :count].tolist() == order[n][:count], (name, n)
        for rank in range(world_size):
            actual = results[rank][index]
            assert torch.equal(actual.indices, dense.indices), (name, rank)
            torch.testing.assert_close(actual.logprobs, dense.logprobs, rtol=0, atol=1e-6)
            torch.testing.assert_close(actual.log_tail, dense.log_tail, rtol=1e-6, atol=1e-7)
    # a narrower cut of stored entries (any slot order) breaks ties the same way
    wide = truncate_dense(logits, TRUE_VOCAB, TruncationSpec.parse("top-1.0-60"))
    shuffled = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    stored = SparseTeacher(wide.indices[:, shuffled], wide.logprobs[:, shuffled],
                           wide.log_tail)
    narrow = TruncationSpec.parse("top-1.0-20")
    cut = retruncate(stored, narrow)
    direct = truncate_dense(logits, TRUE_VOCAB, narrow)
    assert torch.equal(cut.indices, direct.indices)
    torch.testing.assert_close(cut.log_tail, direct.log_tail, rtol=1e-6, atol=1e-7)


def tied_loss(rank, world_size):
    logits = tied_logits()
    kept = truncate_vocab_parallel(logits[:, columns(rank, world_size)],
                                   vocab_of(rank, world_size), TruncationSpec.parse("top-1.0-20"),
                                   dist.group.WORLD)
    student = student_logits()
    x = student[:, columns(rank, world_size)].clone().requires_grad_()
    out = distillation_loss(x, None, kept, LossSpec(kind="forward_kl", tau=2.0),
                            vocab_of(rank, world_size), dist.group.WORLD)
    return out["loss"].detach()


def test_tied_rows_give_the_same_loss_at_tp_1_and_2():
    one = run_distributed(tied_loss, 1)[0]
    two = run_distributed(tied_loss, 2)
    for loss in two:
        torch.testing.assert_close(loss, one, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ 4. the k cap of top-p-inf
def capped(rank, world_size):
    logits = torch.randn(TOKENS, PADDED, generator=torch.Generator().manual_seed(9)) * 0.01
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        truncate_all(rank, world_size, logits, ["top-0.95-inf", "top-0.95-inf"], k_cap=64)
    return [str(w.message) for w in caught if issubclass(w.category, TruncationCapWarning)]


def test_capped_top_p_inf_warns_once_with_the_kept_mass():
    for messages in run_distributed(capped, 2):
        assert len(messages) == 1, messages
        assert "k_cap=64" in messages[0] and "kept mass" in messages[0]
        mass = float(messages[0].split("kept mass ")[1].split()[0])
        assert 0.25 < mass < 0.35  # 64 of 211 near-uniform entries, where 0.95 was asked
    logits = torch.randn(TOKENS, PADDED) * 0.01
    with pytest.warns(TruncationCapWarning, match="k_cap=32"):
        truncate_dense(logits, TRUE_VOCAB, TruncationSpec.parse("top-0.9-inf", k_cap=32))


def test_store_header_names_the_cap():
    from megatron_pd.logits.store_format import truncation_header

    header = truncation_header(TruncationSpec.parse("top-0.95-inf", k_cap=512))
    assert header["k_cap"] == 512 and header["slots"] == 512


# ------------------------------------------------------------------ 5. -inf teacher logits
def masked_teacher_logits():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(TOKENS, PADDED, generator=g) * 3
    logits[:, 10:20] = -math.inf  # masked columns, as some checkpoints carry
    logits[1, 112:TRUE_VOCAB] = -math.inf  # a whole TP=2 shard masked on one row
    logits[:, TRUE_VOCAB:] = -math.inf
    return logits


@pytest.mark.parametrize("world_size", [1, 2])
def test_minus_inf_teacher_logits_follow_xlogy(world_size):
    logits = masked_teacher_logits()
    student = student_logits()
    labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(3))
    specs = [LossSpec(kind=k, alpha=0.8, tau=tau)
             for k in ("forward_kl", "soft_ce", "jsd", "mse_probs") for tau in (1.0, 2.0)]
    per_rank = run_distributed(loss_cases, world_size, student, DenseTeacher(logits), specs,
                               labels, IMPLS)
    for rank_results in per_rank:
        for _, _, loss, grad in rank_results:
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    check_against(per_rank, world_size, student, labels, DenseTeacher(logits.double()))
    # masked columns are never kept, even by top-1.0-k
    kept = run_distributed(truncate_all, world_size, logits, ["top-1.0-300"])[0][0]
    finite = torch.isfinite(logits[:, :TRUE_VOCAB]).sum(-1)
    assert torch.equal(kept.kept_counts(), finite)
    assert (kept.indices[:, :, None] != torch.arange(10, 20)).all()


# ------------------------------------------------------------------ 6. strided inputs
def strided(rank, world_size, impl):
    cols = columns(rank, world_size)
    vocab = vocab_of(rank, world_size)
    student = student_logits()[:, cols]
    teacher = torch.randn(TOKENS, PADDED, generator=torch.Generator().manual_seed(12))[:, cols]
    width = student.shape[1]
    # a column stride of 2 (every other column of a wider buffer) and a transposed storage
    wide = torch.zeros(TOKENS, 2 * width)
    wide[:, ::2] = student
    views = {"contiguous": student.clone(), "stride2": wide[:, ::2],
             "transposed": student.t().contiguous().t()}
    teachers = {"contiguous": teacher.clone(), "transposed": teacher.t().contiguous().t()}
    out = {}
    for name, view in views.items():
        for tname, tview in teachers.items():
            x = view.detach().clone() if name == "contiguous" else view.detach()
            x.requires_grad_()
            result = distillation_loss(x, None, DenseTeacher(tview),
                                       LossSpec(kind="reverse_kl", tau=2.0), vocab,
                                       dist.group.WORLD, impl=impl)
            result["loss"].sum().backward()
            out[name, tname] = (result["loss"].detach(), x.grad.clone())
    return out


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_strided_views_equal_contiguous(impl, world_size):
    for out in run_distributed(strided, world_size, impl):
        want_loss, want_grad = out["contiguous", "contiguous"]
        for key, (loss, grad) in out.items():
            torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-6, msg=str(key))
            torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-6, msg=str(key))


# ------------------------------------------------------------------ 7. bad input is an error
def bad_inputs(rank, world_size, impl, check_inputs):
    cols = columns(rank, world_size)
    vocab = vocab_of(rank, world_size)
    g = torch.Generator().manual_seed(13)
    student = torch.randn(TOKENS, PADDED, generator=g)[:, cols].contiguous()
    teacher = torch.randn(TOKENS, PADDED, generator=g)[:, cols].contiguous()
    labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=g)
    ids = torch.stack([torch.randperm(TRUE_VOCAB, generator=g)[:6] for _ in range(TOKENS)])
    logp = -torch.rand(TOKENS, 6, generator=g) - 2.0
    kl = LossSpec(kind="forward_kl", alpha=0.5)

    def sparse(i=ids, v=logp):
        return SparseTeacher(i, v)

    with_duplicate = ids.clone()
    with_duplicate[3, 1] = with_duplicate[3, 0]
    too_big = ids.clone()
    too_big[2, 4] = TRUE_VOCAB
    negative = ids.clone()
    negative[1, 2] = -7
    positive_logp = logp.clone()
    positive_logp[0, 0] = 0.5
    nan_logp = logp.clone()
    nan_logp[5, 1] = math.nan
    label_padded = labels.clone()
    label_padded[4] = TRUE_VOCAB  # a padding column, outside the true vocabulary
    label_negative = labels.clone()
    label_negative[6] = -3
    tail = torch.log1p(-logp.exp().sum(-1))  # consistent: kept mass + r = 1
    positive_tail, nan_tail, wrong_tail = tail.clone(), tail.clone(), tail.clone()
    positive_tail[2] = 0.75  # r > 1
    nan_tail[4] = math.nan
    wrong_tail[5] = -0.01  # r = 0.99 while the kept entries hold ~0.5
    nowhere = teacher.clone()
    nowhere[3] = -math.inf  # -inf on every rank's shard: no probability anywhere
    nan_student = student.clone()
    nan_student[1, 0] = math.nan
    nan_teacher = teacher.clone()
    nan_teacher[6, 1] = math.nan
    tail_kl = LossSpec(kind="forward_kl", alpha=0.5, tail=True)
    cases = {
        "dense rows": (student, labels, DenseTeacher(teacher[:-1]), kl),
        "sparse rows": (student, labels, sparse(ids[:-1], logp[:-1]), kl),
        "dense wider": (student, labels, DenseTeacher(torch.cat([teacher, teacher[:, :3]], 1)),
                        kl),
        "dense narrower": (student, labels, DenseTeacher(teacher[:, :-3]), kl),
        "student width": (student[:, :-1], labels, None, LossSpec(alpha=0.0)),
        "labels shape": (student, labels[:-1], DenseTeacher(teacher), kl),
        "labels none": (student, None, DenseTeacher(teacher), kl),
        "tuple teacher": (student, labels, (ids, logp), kl),
        "id too big": (student, labels, sparse(too_big), kl),
        "id negative": (student, labels, sparse(negative), kl),
        "duplicate id": (student, labels, sparse(with_duplicate), kl),
        "positive logprob": (student, labels, sparse(ids, positive_logp), kl),
        "nan logprob": (student, labels, sparse(ids, nan_logp), kl),
        "label padded": (student, label_padded, None, LossSpec(alpha=0.0)),
        "label negative": (student, label_negative, None, LossSpec(alpha=0.0)),
        "positive tail": (student, labels, SparseTeacher(ids, logp, positive_tail), tail_kl),
        "nan tail": (student, labels, SparseTeacher(ids, logp, nan_tail), kl),
        "inconsistent tail": (student, labels, SparseTeacher(ids, logp, wrong_tail), tail_kl),
        "teacher nowhere": (student, labels, DenseTeacher(nowhere), kl),
        "nan student": (student if rank else nan_student, labels, None, LossSpec(alpha=0.0)),
        "nan teacher": (student, labels, DenseTeacher(nan_teacher), kl),
    }
    if world_size > 1:  # -inf on one shard only is a legal (masked) row
        partly = teacher.clone()
        partly[3] = -math.inf if rank == 0 else partly[3]
        cases["teacher on one shard"] = (student, labels, DenseTeacher(partly), kl)
    messages = {}
    for name, (s, lab, t, spec) in cases.items():
        try:
            distillation_loss(s, lab, t, spec, vocab, dist.group.WORLD, impl=impl,
                              check_inputs=check_inputs)
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    return messages


EXPECTED_ERRORS = {
    "dense rows": "teacher logits have 7 rows, the student logits 8",
    "sparse rows": "teacher entries have 7 rows, the student logits 8",
    "dense wider": "teacher logits have 115 columns, the student logits 112",
    "dense narrower": "teacher logits have 109 columns, the student logits 112",
    "student width": "student logits have 111 columns",
    "labels shape": "labels have shape (7,)",
    "labels none": "labels=None with alpha=0.5",
    "tuple teacher": "teacher is a tuple",
    "id too big": "teacher ids must be -1 (empty) or in [0, 211): found 211",
    "id negative": "found -7",
    "duplicate id": "teacher ids repeat within a token (row 3",
    "positive logprob": "teacher log-probs must be finite and <= 0",
    "nan logprob": "teacher log-probs must be finite and <= 0",
    "label padded": "labels must be ignore_index (-100) or in [0, 211): found 211",
    "label negative": "found -3",
    "positive tail": "teacher log_tail (log of the dropped mass r) must be <= 0: found 0.75",
    "nan tail": "must be <= 0: found nan at token 4",
    "inconsistent tail": "do not add up to probability 1",
    "teacher nowhere": "teacher logits are -inf at every column of token 3",
    "nan teacher": "teacher logits are NaN at token 6",
    "nan student": "student logits are NaN at token 1",  # one rank's shard: all ranks raise
}
VALUE_CHECKS = {"id too big", "id negative", "duplicate id", "positive logprob", "nan logprob",
                "label padded", "label negative", "positive tail", "nan tail",
                "inconsistent tail", "teacher nowhere", "nan teacher", "nan student"}


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_is_a_clear_error(impl):
    for messages in run_distributed(bad_inputs, 2, impl, True):
        for name, want in EXPECTED_ERRORS.items():
            got = messages[name]
            assert got is not None and want in got, (name, got)
        assert messages["teacher on one shard"] is None


def test_tau_must_be_finite():
    with pytest.raises(ValueError, match="tau=inf: must be finite and > 0"):
        LossSpec(tau=math.inf)


def test_truncating_a_row_without_probability_is_an_error():
    logits = torch.randn(4, 30)
    logits[2] = -math.inf
    with pytest.raises(ValueError, match="-inf at every column of token row 2"):
        truncate_dense(logits, 30, TruncationSpec.parse("top-0.95-5"))


def test_value_checks_can_be_turned_off_but_shape_checks_cannot():
    for messages in run_distributed(bad_inputs, 1, "torch", False):
        for name in EXPECTED_ERRORS:
            if name == "student width":
                continue  # TP=1 here: 224 columns, width 223 is still wrong
            if name in VALUE_CHECKS:
                assert messages[name] is None, (name, messages[name])
            else:
                assert messages[name] is not None, name


# ------------------------------------------------------------------ more edges
@pytest.mark.parametrize("world_size", [1, 2])
def test_nothing_dropped_means_zero_tail(world_size):
    """top-1.0-k with k >= V keeps everything: r = 0 exactly; every tail loss stays finite and
    equals the dense teacher's (the ghost category is empty on both sides)."""
    logits = torch.randn(TOKENS, PADDED, generator=torch.Generator().manual_seed(14)) * 3
    teacher = run_distributed(truncate_all, world_size, logits, ["top-1.0-256"])[0][0]
    assert (teacher.kept_counts() == TRUE_VOCAB).all() and torch.isneginf(teacher.log_tail).all()
    student = student_logits()
    labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(5))
    specs = [LossSpec(kind=k, alpha=0.6, tau=2.0, tail=True)
             for k in ("reverse_kl", "forward_kl", "jsd", "mse_probs")]
    per_rank = run_distributed(loss_cases, world_size, student, teacher, specs, labels, IMPLS)
    for rank_results in per_rank:
        for _, _, loss, grad in rank_results:
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    check_against(per_rank, world_size, student, labels, DenseTeacher(logits.double()))


def confident_student(rank, world_size, impl, gap):
    """The student leaves (almost) nothing outside the kept set of a teacher with a large tail
    (r ~ 0.9) while the KD term is scaled by a large upstream gradient (fp16 loss scaling):
    the outside derivative -r / G is enormous, the gradient must stay finite."""
    cols = columns(rank, world_size)
    logits = torch.randn(TOKENS, PADDED, generator=torch.Generator().manual_seed(15))
    kept = truncate_vocab_parallel(logits[:, cols], vocab_of(rank, world_size),
                                   TruncationSpec.parse("top-1.0-3"), dist.group.WORLD)
    student = torch.zeros(TOKENS, PADDED)
    student.scatter_(1, kept.indices, gap)  # G = 208 e^-gap: 0 at 120, ~1e-37 at 90
    x = student[:, cols].clone().requires_grad_()
    out = distillation_loss(x, None, kept, LossSpec(kind="forward_kl", tail=True),
                            vocab_of(rank, world_size), dist.group.WORLD, impl=impl)
    (out["loss"] * 65536.0).sum().backward()
    return out["loss"].detach(), x.grad, kept.log_tail


@pytest.mark.parametrize("gap", [90.0, 120.0])
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
def test_loss_scaled_tail_gradient_is_finite(impl, gap):
    for loss, grad, log_tail in run_distributed(confident_student, 2, impl, gap):
        assert log_tail.exp().min() > 0.5  # a large tail
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        # the loss is about -r log G: 90 or 120 nats times r, plus r log r
        assert (loss > 0.5 * gap * 0.5).all()


def no_tokens(rank, world_size, impl):
    vocab = vocab_of(rank, world_size)
    width = vocab.shard_size
    x = torch.zeros(0, width, requires_grad=True)
    empty = SparseTeacher(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4))
    results = []
    for teacher in (None, DenseTeacher(torch.zeros(0, width)), empty):
        spec = LossSpec(alpha=0.5 if teacher is not None else 0.0)
        out = distillation_loss(x, torch.zeros(0, dtype=torch.long), teacher, spec, vocab,
                                dist.group.WORLD, impl=impl)
        out["loss"].sum().backward()
        results.append(tuple(out["loss"].shape))
    return results


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_tokens(impl):
    for shapes in run_distributed(no_tokens, 2, impl):
        assert shapes == [(0,), (0,), (0,)]
