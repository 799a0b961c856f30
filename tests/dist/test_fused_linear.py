"""The fused output layer + loss equals the logits path's dense reference, at TP = 1, 2 and 4.

Loss (the mask-weighted sum and every per-token value), the hidden states' gradient and each
rank's gradient of its output-weight shard, for every loss kind, dense and sparse teachers
(with and without tail), a teacher given as hidden states, tau 0.5 and 2, alpha 0, 0.9 and 1;
a prime true vocabulary padded past the last shard, ignored tokens, masked tokens, chunks that
do not divide the tokens; torch, Triton (interpreter) and inductor-compiled paths, row-major
and vocab-major chunks (the multi-threaded CPU layout); sequence-parallel input. The
oracle: logits h W^T over the full vocabulary and the dense float64 reference with autograd.
"""

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

from megatron_pd.loss import fused_linear as FL
from megatron_pd.loss import compiled_kernels, triton_kernels
from megatron_pd.loss.fused_linear import HiddenTeacher, fused_linear_distillation_loss
from megatron_pd.loss.reference import reference_loss
from megatron_pd.loss.spec import KD_KINDS, DenseTeacher, LossSpec, SparseTeacher
from megatron_pd.parallel.collectives import gather_dim0
from megatron_pd.parallel.vocab import VocabInfo

TRUE_VOCAB, PADDED, TOKENS, HIDDEN, TEACHER_HIDDEN, KEEP, CHUNK = 97, 104, 14, 24, 20, 8, 5
# fp32 GEMMs and the fused loss vs float64: rounding of h W^T over 24 dims and of the
# log-sum-exp over ~100 columns, both < 1e-5 on O(1) values; real mistakes are > 1e-3.
ATOL = 3e-5
IMPLS = ["torch"] + (["triton"] if triton_kernels.triton_available()[0] else [])

TEACHERS = [("dense", False), ("sparse", False), ("sparse", True), ("hidden", False)]
CASES = [
    (kind, teacher, tail, tau, alpha)
    for kind in KD_KINDS
    for teacher, tail in TEACHERS
    if not (teacher == "sparse" and kind == "mse_logits")
    and not (teacher == "sparse" and kind == "reverse_kl" and not tail)
    for tau, alpha in ((0.5, 0.9), (2.0, 1.0), (1.0, 0.0))
]


def global_inputs():
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(PADDED, HIDDEN, generator=g, dtype=torch.float64) * 0.6
    teacher_hidden = torch.randn(TOKENS, TEACHER_HIDDEN, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(PADDED, TEACHER_HIDDEN, generator=g, dtype=torch.float64) * 0.7
    teacher_logits = teacher_hidden @ teacher_weight.t()
    labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=g)
    labels[[2, 9]] = -100
    mask = torch.ones(TOKENS, dtype=torch.float64)
    mask[[4, 11]] = 0.0
    logp = torch.log_softmax(teacher_logits[:, :TRUE_VOCAB], -1)
    values, index = logp.topk(KEEP, -1)
    index[6, 5:] = -1
    values = torch.where(index >= 0, values, torch.zeros_like(values))
    return (
        hidden,
        weight,
        teacher_hidden,
        teacher_weight,
        teacher_logits,
        labels,
        mask,
        SparseTeacher(index, values),
    )


def cols(rank, world_size):
    width = PADDED // world_size
    return slice(rank * width, (rank + 1) * width)


def fused_cases(rank, world_size, cases, impl, sequence_parallel=False, transposed=False):
    if transposed:  # what more than one CPU thread selects (forked workers keep to one: an
        # OpenMP pool after fork can hang): GEMMs through a scratch, turned round
        FL.transposed_gemms = lambda device: True
    assert FL.transposed_gemms(torch.device("cpu")) == transposed
    hidden, weight, t_hidden, t_weight, t_logits, labels, mask, sparse = global_inputs()
    c = cols(rank, world_size)
    vocab = VocabInfo(TRUE_VOCAB, PADDED, world_size, rank)
    sparse32 = SparseTeacher(sparse.indices, sparse.logprobs.float())
    results = []
    for kind, teacher_kind, tail, tau, alpha in cases:
        spec = LossSpec(kind=kind, alpha=alpha, tau=tau, tail=tail)
        h = hidden.float().clone().requires_grad_()
        w = weight[c].float().clone().requires_grad_()
        teacher = {
            "dense": DenseTeacher(t_logits[:, c].float()),
            "sparse": sparse32,
            "hidden": HiddenTeacher(t_hidden.float(), t_weight[c].float()),
        }[teacher_kind]
        rows = slice(None)
        h_in = h
        if sequence_parallel:  # this rank's sequence shard of the hidden states
            per = TOKENS // world_size
            rows = slice(rank * per, min((rank + 1) * per, TOKENS))
            h_in = gather_dim0(h[rows], dist.group.WORLD)
        log = []
        out = fused_linear_distillation_loss(
            h_in,
            w,
            labels,
            mask.float(),
            teacher,
            spec,
            vocab,
            dist.group.WORLD,
            impl=impl,
            chunk_tokens=CHUNK,
            sequence_parallel=sequence_parallel,
            collectives=log,
        )
        out["weighted"].backward()
        results.append((out["weighted"].detach(), out["loss"], h.grad, w.grad, len(log)))
    return results


def reference_case(kind, teacher_kind, tail, tau, alpha):
    hidden, weight, t_hidden, t_weight, t_logits, labels, mask, sparse = global_inputs()
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    teacher = sparse if teacher_kind == "sparse" else DenseTeacher(t_logits)
    spec = LossSpec(kind=kind, alpha=alpha, tau=tau, tail=tail)
    out = reference_loss(h @ w.t(), labels, teacher if alpha > 0 else None, spec, TRUE_VOCAB)
    weighted = (out["loss"] * mask).sum()
    weighted.backward()
    return weighted.detach(), out["loss"].detach(), h.grad, w.grad


def check(per_rank, world_size, cases, sequence_parallel=False):
    for index, case in enumerate(cases):
        want_sum, want_loss, want_h, want_w = reference_case(*case)
        for rank in range(world_size):
            got_sum, got_loss, got_h, got_w, _ = per_rank[rank][index]
            where = f"{case} rank {rank}"
            torch.testing.assert_close(
                got_sum.double(),
                want_sum,
                rtol=1e-6,
                atol=ATOL,
                msg=lambda m, w=where: f"{w} sum: {m}",
            )
            torch.testing.assert_close(
                got_loss.double(),
                want_loss,
                rtol=0,
                atol=ATOL,
                msg=lambda m, w=where: f"{w} loss: {m}",
            )
            if sequence_parallel:  # each rank holds (and gets the gradient of) its own rows
                per = TOKENS // world_size
                own = slice(rank * per, (rank + 1) * per)
                assert (got_h[: own.start] == 0).all() and (got_h[own.stop :] == 0).all()
                got_h, want_h_rank = got_h[own], want_h[own]
            else:
                want_h_rank = want_h
            torch.testing.assert_close(
                got_h.double(),
                want_h_rank,
                rtol=1e-5,
                atol=ATOL,
                msg=lambda m, w=where: f"{w} dL/dh: {m}",
            )
            torch.testing.assert_close(
                got_w.double(),
                want_w[cols(rank, world_size)],
                rtol=1e-5,
                atol=ATOL,
                msg=lambda m, w=where: f"{w} dL/dW: {m}",
            )


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_fused_linear_torch_equals_reference(world_size):
    per_rank = run_distributed(fused_cases, world_size, CASES, "torch")
    check(per_rank, world_size, CASES)
    chunks = -(-TOKENS // CHUNK)
    for rank_results, case in zip(zip(*per_rank), CASES):
        expected = chunks * (2 if case[0] == "jsd" else 1)
        assert all(r[4] == expected for r in rank_results), case  # collectives per chunk


@pytest.mark.parametrize("world_size", [1, 2])
def test_vocab_major_chunks_equal_reference(world_size):
    """The multi-threaded CPU path of the torch loss: every [C, v] buffer vocab-major, logits
    made as W h^T straight into it, dL/dh as W^T dL/dz^T (every case: the loss's passes, the
    sparse teacher's gathers and scatters and the row dot products all run on that layout);
    the last chunk is shorter than the buffers."""
    per_rank = run_distributed(fused_cases, world_size, CASES, "torch", False, True)
    check(per_rank, world_size, CASES)


@pytest.mark.skipif("triton" not in IMPLS, reason="triton cannot run here")
def test_transposed_gemms_row_major_equal_reference():
    """The Triton loss on multi-threaded CPU keeps row-major chunks: logits and dL/dh made as
    W h^T and W^T dL/dz^T in a scratch, then copied transposed."""
    subset = [c for c in CASES if c[0] in ("forward_kl", "reverse_kl") and c[3] == 0.5]
    check(run_distributed(fused_cases, 1, subset, "triton", False, True), 1, subset)


def test_chunk_buffers_layout():
    """What selects the layout: vocab-major only for the torch loss where the GEMMs are
    turned round; the views are [C, v] either way, and W h^T lands in them unchanged."""
    hidden, weight = torch.randn(6, 8), torch.randn(11, 8)
    for vocab_major in (False, True):
        buffers = FL._ChunkBuffers(4, 11, hidden, None, True, vocab_major)
        got = buffers.logits(hidden[:3], weight)
        assert got.shape == (3, 11)
        assert (got.stride() == (1, 3)) == vocab_major
        torch.testing.assert_close(got, hidden[:3] @ weight.t())
        assert buffers.grad_view(3).stride() == got.stride()


def test_transposed_gemms_where_cpu_threads_allow():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not FL.transposed_gemms(torch.device("cpu"))
        torch.set_num_threads(2)
        assert FL.transposed_gemms(torch.device("cpu"))
        assert not FL.transposed_gemms(torch.device("cuda"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif("triton" not in IMPLS, reason="triton cannot run here")
@pytest.mark.parametrize("world_size", [1, 2])
def test_fused_linear_triton_equals_reference(world_size):
    subset = [c for c in CASES if c[3] != 1.0]
    check(run_distributed(fused_cases, world_size, subset, "triton"), world_size, subset)


@pytest.mark.skipif(
    not compiled_kernels.compiled_available("cpu")[0],
    reason=str(compiled_kernels.compiled_available("cpu")[1]),
)
def test_fused_linear_compiled_equals_reference():
    """The compiled row kernels on the vocab-major chunks they get on multi-threaded CPU (and
    the shorter last chunk), TP = 2: forward KL from every kind of teacher and JSD (its second
    pass) at tau 0.5, and CE only (alpha 0). Every loss kind's kernels: test_row_kernels.py."""
    subset = [
        c
        for c in CASES
        if (c[0] == "forward_kl" and c[3] == 0.5)
        or (c[0] == "jsd" and c[3] == 0.5 and c[1] == "dense")
        or (c[0] == "forward_kl" and c[4] == 0.0 and c[1] == "dense")
    ]
    per_rank = run_distributed(fused_cases, 2, subset, "compiled", False, True)
    check(per_rank, 2, subset)


def test_sequence_parallel_input():
    subset = [c for c in CASES if c[0] in ("forward_kl", "jsd") and c[3] == 2.0]
    check(run_distributed(fused_cases, 2, subset, "torch", True), 2, subset, True)


def reference_impl(rank, world_size):
    hidden, weight, t_hidden, t_weight, _, labels, mask, sparse = global_inputs()
    c = cols(rank, world_size)
    vocab = VocabInfo(TRUE_VOCAB, PADDED, world_size, rank)
    out = {}
    for impl in ("reference", "torch"):
        h = hidden.float().clone().requires_grad_()
        w = weight[c].float().clone().requires_grad_()
        res = fused_linear_distillation_loss(
            h,
            w,
            labels,
            mask.float(),
            HiddenTeacher(t_hidden.float(), t_weight[c].float()),
            LossSpec(kind="reverse_kl", alpha=0.5, tau=2.0),
            vocab,
            dist.group.WORLD,
            impl=impl,
        )
        res["weighted"].backward()
        out[impl] = (res["weighted"].detach(), h.grad, w.grad)
    return out


def test_reference_implementation_has_the_same_signature():
    for out in run_distributed(reference_impl, 2):
        for a, b in zip(out["reference"], out["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL)


def no_grad_eval(rank, world_size):
    hidden, weight, *_, labels, mask, _ = global_inputs()
    vocab = VocabInfo(TRUE_VOCAB, PADDED, 1, 0)
    with torch.no_grad():
        out = fused_linear_distillation_loss(
            hidden.float().requires_grad_(),
            weight.float().requires_grad_(),
            labels,
            mask.float(),
            None,
            LossSpec(alpha=0.0),
            vocab,
            dist.group.WORLD,
        )
    return out["weighted"].requires_grad, out["loss"]


def test_evaluation_makes_no_gradient():
    requires_grad, loss = run_distributed(no_grad_eval, 1)[0]
    assert not requires_grad and torch.isfinite(loss).all()


def test_shape_errors():
    vocab = VocabInfo(TRUE_VOCAB, PADDED, 1, 0)
    with pytest.raises(ValueError, match="must be \\[tokens, H\\]"):
        fused_linear_distillation_loss(
            torch.zeros(3, 5),
            torch.zeros(PADDED, 4),
            None,
            torch.ones(3),
            None,
            LossSpec(alpha=0.0),
            vocab,
            None,
        )
    with pytest.raises(ValueError, match="student logits have 100 columns"):
        fused_linear_distillation_loss(
            torch.zeros(3, 4),
            torch.zeros(100, 4),
            None,
            torch.ones(3),
            None,
            LossSpec(alpha=0.0),
            vocab,
            None,
        )
    with pytest.raises(ValueError, match="token weights have shape"):
        fused_linear_distillation_loss(
            torch.zeros(3, 4),
            torch.zeros(PADDED, 4),
            None,
            torch.ones(2),
            None,
            LossSpec(alpha=0.0),
            vocab,
            None,
        )


def into_main_grad(rank, world_size, upstream):
    hidden, weight, *_, labels, mask, _ = global_inputs()
    vocab = VocabInfo(TRUE_VOCAB, PADDED, 1, 0)
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    w.main_grad = torch.full(w.shape, 0.5)  # megatron DDP's fp32 buffer, holding earlier sums
    w.grad_added_to_main_grad = False
    out = fused_linear_distillation_loss(
        h,
        w,
        labels,
        mask.float(),
        None,
        LossSpec(alpha=0.0),
        vocab,
        dist.group.WORLD,
        chunk_tokens=CHUNK,
        grad_scale=4.0,
    )
    (out["weighted"] * upstream).backward()
    return w.main_grad, w.grad_added_to_main_grad, h.grad


def test_weight_gradient_straight_into_main_grad():
    """With megatron DDP's main_grad and the upstream gradient announced (grad_scale), dL/dW
    is added to main_grad in place (no [v, H] gradient tensor); a different upstream value is
    an error, not a silently mis-scaled gradient."""
    main_grad, flagged, grad_h = run_distributed(into_main_grad, 1, 4.0)[0]
    _, _, want_h, want_w = reference_case("forward_kl", "dense", False, 1.0, 0.0)
    torch.testing.assert_close(main_grad.double(), 0.5 + 4.0 * want_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_h.double(), 4.0 * want_h, rtol=1e-5, atol=1e-4)
    assert flagged
    with pytest.raises(AssertionError, match="scaled by 4.0, but backward received 2.0"):
        run_distributed(into_main_grad, 1, 2.0)


def test_default_chunks_bound_the_buffers_and_feed_the_gemms():
    from megatron_pd.loss.fused_linear import default_fused_chunk

    for width in (64, 4096, 18944, 32000, 75776, 151552, 1 << 20):
        cpu, cuda = default_fused_chunk(width), default_fused_chunk(width, "cuda")
        # CPU: >= 2^21 elements per buffer or 256 rows; never past 2^25 elements beyond 16 rows
        assert cpu * width >= min(1 << 21, (256 if width >= 24576 else 192) * width)
        assert cpu >= 16 and cpu % 16 == 0  # MKL: 221-row chunks ran 1.5x slower than 208
        assert cpu * width <= (1 << 25) or cpu * width < (1 << 21) + 16 * width or cpu == 16
        # CUDA: 256-2048 rows in multiples of 64, at most 2^26 elements unless at 256 rows
        assert 256 <= cuda <= 2048 and cuda % 64 == 0
        assert cuda * width <= (1 << 26) or cuda == 256
    assert default_fused_chunk(151552) == 208 and default_fused_chunk(151552, "cuda") == 384


def forward_then_grad(rank, world_size, cases):
    """For each (kind, teacher, tau, vocab_major): the gradient of one chunk made from what
    the forward left in its workspace, made afresh, and made from a workspace whose
    exponentials were overwritten with NaN after the forward."""
    from megatron_pd.loss import stats as S
    from megatron_pd.loss import vocab_parallel as VP

    g = torch.Generator().manual_seed(5)
    vocab = VocabInfo(TRUE_VOCAB, PADDED, world_size, rank)
    width = PADDED // world_size
    results = []
    for kind, teacher_kind, tau, vocab_major in cases:
        alpha = 0.0 if teacher_kind is None else 0.7
        spec = LossSpec(kind=kind, alpha=alpha, tau=tau, tail=teacher_kind == "sparse")
        student = torch.randn(width, TOKENS, generator=g)
        student = student.t() if vocab_major else student.t().contiguous()
        labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=g)
        teacher = None
        if teacher_kind == "dense":
            teacher = torch.randn(TOKENS, width, generator=g)
            teacher = teacher.t().contiguous().t() if vocab_major else teacher
        sparse = None
        if teacher_kind == "sparse":
            logp = torch.log_softmax(torch.randn(TOKENS, TRUE_VOCAB, generator=g), -1)
            values, index = logp.topk(KEEP, -1)
            sparse = VP._sparse_prep(SparseTeacher(index, values), spec, vocab)
        weights = torch.ones(TOKENS)

        def grad(from_forward, poison=False):
            ws = S.Workspace(TOKENS, vocab.valid_in_shard, "cpu", vocab_major=vocab_major)
            fwd = VP.loss_forward(
                student,
                labels,
                teacher,
                sparse,
                spec,
                vocab,
                dist.group.WORLD,
                TOKENS,
                [],
                False,
                "torch",
                ws,
            )
            if poison:
                for name in ws.fresh:
                    ws.get(name, TOKENS).fill_(float("nan"))
            ce, kd = VP.grad_weights(fwd, spec, weights)
            out = torch.empty_like(student)
            VP.loss_grad(
                out,
                student,
                labels,
                teacher,
                sparse,
                fwd,
                ce,
                kd,
                spec,
                vocab,
                TOKENS,
                "torch",
                ws,
                from_forward=from_forward,
            )
            return out, sorted(ws.fresh)

        reused, fresh = grad(True)
        again, _ = grad(False)
        poisoned, _ = grad(True, poison=True)
        results.append((reused, again, poisoned, fresh))
    return results


@pytest.mark.parametrize("world_size", [1, 2])
def test_gradient_reuses_the_forward_exponentials(world_size):
    """loss_grad(from_forward=True) equals the gradient made afresh, and it does read the
    forward's buffers (NaN written into them after the forward reaches the gradient). A
    sparse teacher with tail leaves no student exponentials (outside_exp_sum zeroes the kept
    columns). The softmax the hard-label CE uses is never rescaled (alpha = 0 reproduces
    LM-only training bit for bit): where the CE shares the student's softmax (tau 1) the
    student's part of the gradient is bitwise the one made afresh."""
    cases = [
        (kind, teacher, tau, vocab_major)
        for kind, teacher, tau in (
            ("forward_kl", "dense", 1.0),
            ("forward_kl", "dense", 2.0),
            ("reverse_kl", "dense", 0.5),
            ("jsd", "dense", 1.0),
            ("mse_logits", "dense", 1.0),
            ("soft_ce", "sparse", 1.0),
            ("mse_probs", "sparse", 2.0),
            ("forward_kl", None, 1.0),
        )
        for vocab_major in (False, True)
    ]
    per_rank = run_distributed(forward_then_grad, world_size, cases)
    for results in per_rank:
        for case, (reused, again, poisoned, fresh) in zip(cases, results):
            torch.testing.assert_close(reused, again, rtol=1e-5, atol=1e-7, msg=str(case))
            kind, teacher, tau, _ = case
            if teacher is None:  # the CE alone: nothing rescaled
                assert torch.equal(reused, again) and not torch.isnan(poisoned).any(), case
                assert fresh == ["exp_s"], case
                continue
            expected = {"exp_s", "exp_t"} if teacher == "dense" else set()
            if tau != 1.0:
                expected |= {"s", "t"} if teacher == "dense" else {"s"}
            assert set(fresh) == expected, case
            # at tau 1 the student's softmax is the CE's (made afresh), and mse_logits has no
            # teacher softmax: nothing of the forward's is read there
            reads = bool(fresh) and not (kind == "mse_logits" and tau == 1.0)
            assert torch.isnan(poisoned).any() == reads, case
