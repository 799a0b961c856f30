"""The output layer fused into the distillation loss: no [tokens x vocab] logits, ever.

    fused_linear_distillation_loss(hidden_NH, weight_vH, labels_N, token_weights_N, teacher,
                                   spec, vocab, tp_group, impl=...)

The student's final hidden states h [N, H] and this rank's vocab shard of the output weight
W [v, H] (the untied output layer's, or the tied word embedding's) go into one autograd
Function. Token chunk by chunk it computes the chunk's logits h_c W^T [C, v], the fused
loss's statistics on them (loss/vocab_parallel.py: every loss, dense or sparse teacher, tau,
tail, the hard-label CE in the same pass; one all-gather of [C, c] per chunk, JSD one
all-reduce more) and - because the loss is the last operation - at once the gradient of
the weighted sum  sum_t w_t loss_t  with respect to those logits, which two GEMMs turn into
this chunk's rows of dL/dh and its contribution to dL/dW. The chunk's logits and gradient
are then dropped: what lives past the forward is dL/dh [N, H], the fp32 dL/dW accumulator
[v, H] (the size of the weight's own gradient, which autograd hands back anyway) and per-token
values. Backward only scales them by the upstream scalar. No GEMM is recomputed. The chunk's
gradient reuses the exponentials its statistics made (loss_grad(from_forward=True)): each
softmax is one multiply of what the forward left, not a subtract and an exp.

On multi-threaded CPU (transposed_gemms) the torch loss runs on vocab-major chunks: every
[C, v] buffer is a [v, C] block seen transposed, the layout in which W h^T comes out of the
fast product and dL/dz^T goes into the two gradient GEMMs, so nothing is transposed.

``token_weights_N`` (the loss mask of the micro-batch) must be known before the forward, so the
Function returns the weighted sum as its differentiable output (per-token values come back
detached, for reporting). With tensor parallelism every rank holds the same h; its gradient
parts are summed over ``tp_group`` in backward (``copy_to_group``); with sequence parallelism
``hidden_NH`` is this rank's sequence shard, gathered first (``gather_dim0``). A teacher may be
given as its hidden states with its output-weight shard in the student's vocab layout
(``HiddenTeacher``): its logits are then also made chunk by chunk.

Four implementations, one signature: ``reference`` (the logits h W^T, then the dense reference
loss with autograd), ``torch``, ``triton`` and ``compiled`` (this Function, with the row
kernels of loss/triton_kernels.py or loss/compiled_kernels.py on each chunk). Shape legend: N
tokens, H hidden, v this rank's vocab shard (padded), C tokens of a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_pd.loss import stats as S
from megatron_pd.loss import vocab_parallel as VP
from megatron_pd.loss.spec import DenseTeacher, LossSpec, SparseTeacher
from megatron_pd.parallel.collectives import copy_to_group
from megatron_pd.parallel.vocab import VocabInfo


@dataclass
class HiddenTeacher:
    """A dense teacher given as its final hidden states [N, H_t] and the rows of its output
    weight in the student's vocab layout [v, H_t] (the hidden-state exchange)."""

    hidden: torch.Tensor
    weight: torch.Tensor

    def logits(self, start: int, end: int) -> torch.Tensor:
        """Its logits for tokens [start, end), whole (the fused loop makes them chunk by chunk
        in its own buffers: _ChunkBuffers.teacher_product)."""
        return self.hidden[start:end] @ self.weight.t()


def chunk_logits(hidden_CH, weight_vH, out_Cv, scratch=None) -> torch.Tensor:
    """out = h W^T for a chunk of rows [C, H] and a vocab shard [v, H], into ``out_Cv``.

    With a ``scratch`` tensor of at least v * C elements (of out's dtype; CPU), the product
    is made as W h^T [v, C] there and copied transposed into ``out_Cv``: a GEMM whose large
    operand is the one streamed once (faster with several CPU threads: transposed_gemms); the
    result is the same (the sums run over H in the same order; checked bitwise)."""
    if scratch is None or scratch.dtype != out_Cv.dtype or hidden_CH.dtype != out_Cv.dtype:
        return torch.mm(hidden_CH, weight_vH.t(), out=out_Cv)
    rows, width = out_Cv.shape
    flat = scratch.view(-1)[: rows * width].view(width, rows)
    torch.mm(weight_vH, hidden_CH.t(), out=flat)
    return out_Cv.copy_(flat.t())


def transposed_gemms(device: torch.device) -> bool:
    """Whether chunk_logits / chunk_grad_hidden go through a scratch here: on CPU with more
    than one thread. Per 4096 rows, H=2048: with two threads, v=151,552, C=208, h W^T 19.4 s
    vs W h^T + copy 16.3 s, dL/dz W 18.6 s vs 16.1 s (v=32,000, C=256: 3.94 vs 3.40 s, 3.72
    vs 3.29 s); with one thread (a rank of TP=2 on 2 cores; v=75,776, C=256) 15.7 vs 15.3 s
    but 14.2 vs 15.0 s: MKL splits the direct products' few rows badly over threads."""
    return device.type == "cpu" and torch.get_num_threads() > 1


def chunk_grad_hidden(grad_Cv, weight_vH, out_CH, scratch=None) -> torch.Tensor:
    """out = dL/dz W [C, H], the same way round as chunk_logits: with a ``scratch`` of at
    least H * C elements, W^T dL/dz^T [H, C] there and a transposing copy."""
    if scratch is None or scratch.dtype != out_CH.dtype or grad_Cv.dtype != out_CH.dtype:
        return torch.mm(grad_Cv, weight_vH, out=out_CH)
    rows, hidden = out_CH.shape
    flat = scratch.view(-1)[: rows * hidden].view(hidden, rows)
    torch.mm(weight_vH.t(), grad_Cv.t(), out=flat)
    return out_CH.copy_(flat.t())


def default_fused_chunk(shard_width: int, device_type: str = "cpu") -> int:
    """Tokens per chunk for a [C, v] shard width ``v`` on a device type.

    CPU: at least 2^21 elements per [C, v] buffer, and up to 256 rows while a buffer stays
    within 2^25 elements (128 MB in fp32; about four live at once). Every chunk's two GEMMs
    with the weight (h W^T and dL/dz W) pack the whole [v, H] shard again, so few rows make
    them slow: at V=151,552, H=2048 on 2 cores, 16-row chunks took 2.8x the logits path's
    time; those two GEMMs took 1.2-1.3x longer in 110-row chunks than in 220-row ones, and
    at V=32,000 1.2x longer in 128-row chunks than in 256-row ones (208 and 256 rows now;
    192 for shards narrower than 24,576 columns, where 256 rows broke the memory target).
    The fp32 accumulation of dL/dW runs at full speed from 110 rows. Rows come in multiples
    of 16: MKL's W h^T (chunk_logits) at v=151,552 took 24.4 s per 4096 rows in 221-row
    chunks and 16.1-16.3 s in 192, 208, 224 or 256-row ones.

    CUDA: the weight gradient is accumulated into the fp32 [v, H] main_grad chunk after chunk,
    reading and writing 8 bytes per element for 2C flops; a GPU with ~200 flops per byte of
    HBM bandwidth (H100/H200 in bf16) needs C in the high hundreds for that GEMM not to wait on
    memory. So chunks are buffers of up to 2^26 elements (128 MB in bf16), 256 to 2048 rows,
    in multiples of 64: 384 rows at v=151,552, 2048 at v <= 32,768. tools/gpu_check.py
    measures the default against half and double."""
    width = max(shard_width, 1)
    if device_type == "cuda":
        rows = min(2048, max(256, (1 << 26) // width))
        return rows - rows % 64
    if width < 24576:
        # narrow shards: dL/dh [N, H] is a larger part of the extra memory, so fewer rows
        # (v=16,000, H=2048, N=4096: 0.167 of the logits path's peak at 256 rows)
        return max(-(-(1 << 21) // width // 16) * 16, 192)  # 2^21 elements, rounded up
    rows = min(256, (1 << 25) // width)  # (from 24,576 columns this holds 2^21 elements)
    return max(16, rows - rows % 16)


class _ChunkBuffers:
    """The fused loop's [C, v] buffers, allocated once: the student's logits, a dense or
    hidden-state teacher's, and their gradient, and how each chunk's products go into them.

    Row-major (CUDA, one CPU thread, the Triton kernels): h W^T straight into the logits
    buffer, or on multi-threaded CPU W h^T through the gradient's buffer and a transposing
    copy (chunk_logits). ``vocab_major``: every buffer is a [v, C] block seen as [C, v]
    (stats.chunk_view), so W h^T lands in it as it is, and dL/dz^T is the [v, C] operand the
    two gradient GEMMs read directly. A dense teacher's logits are not copied here."""

    def __init__(self, rows, width, hidden_NH, teacher, needs_grad, vocab_major):
        self.width, self.vocab_major = width, vocab_major
        device, dtype = hidden_NH.device, hidden_NH.dtype
        size = rows * width
        self.student = torch.empty(size, dtype=dtype, device=device)
        self.grad = torch.empty_like(self.student) if needs_grad else None
        self.teacher = None
        if isinstance(teacher, HiddenTeacher):
            self.teacher = torch.empty(size, dtype=teacher.hidden.dtype, device=device)
        # on multi-threaded CPU the products are made the other way round: row-major chunks
        # go through a scratch (the gradient's buffer, free until the loss writes it), and
        # dL/dh through its own [H, C] one
        transposed = transposed_gemms(device)
        self.scratch = self.grad if transposed and not vocab_major else None
        self.hidden_scratch = None
        if transposed and needs_grad:
            self.hidden_scratch = torch.empty(rows * hidden_NH.shape[1], dtype=dtype, device=device)

    def _view(self, flat, rows):
        return S.chunk_view(flat, rows, self.width, self.vocab_major)

    def _product(self, flat, hidden_CH, weight_vH):
        out = self._view(flat, hidden_CH.shape[0])
        if self.vocab_major:
            torch.mm(weight_vH, hidden_CH.t(), out=out.t())
            return out
        return chunk_logits(hidden_CH, weight_vH, out, self.scratch)

    def logits(self, hidden_CH, weight_vH):
        return self._product(self.student, hidden_CH, weight_vH)

    def teacher_product(self, teacher: HiddenTeacher, start: int, end: int):
        return self._product(self.teacher, teacher.hidden[start:end], teacher.weight)

    def grad_view(self, rows):
        return self._view(self.grad, rows)


class FusedLinearDistillFunction(torch.autograd.Function):
    """sum_t w_t * ((1 - alpha) CE_t + alpha KD_t) from hidden states; see module doc."""

    @staticmethod
    def forward(
        ctx,
        hidden_NH,
        weight_vH,
        labels_N,
        token_weights_N,
        teacher,
        spec: LossSpec,
        vocab: VocabInfo,
        tp_group,
        chunk_tokens: int,
        metrics: bool,
        impl: str,
        stats_log: list,
        needs_grad: bool,
        main_grad_scale: float | None,
    ):
        num_tokens = hidden_NH.shape[0]
        device = hidden_NH.device
        sparse = None
        if isinstance(teacher, SparseTeacher):
            sparse = VP._sparse_prep(teacher, spec, vocab)
        names = ("loss", "lm", "kd", "teacher_entropy", "agree", "kept")
        out = {name: torch.zeros(num_tokens, device=device) for name in names}
        grad_hidden = torch.zeros_like(hidden_NH) if needs_grad else None
        # dL/dW: straight into megatron DDP's fp32 main_grad (scaled now by what backward will
        # receive), or into an fp32 accumulator that backward scales and returns
        wants_wgrad = needs_grad and ctx.needs_input_grad[1]
        into_main = wants_wgrad and main_grad_scale is not None
        grad_weight, wgrad_alpha = None, 1.0
        if into_main:
            grad_weight, wgrad_alpha = weight_vH.main_grad, main_grad_scale
        elif wants_wgrad:  # the first chunk's product overwrites it (beta = 0): no memset
            make = torch.empty if num_tokens else torch.zeros
            grad_weight = make(weight_vH.shape, dtype=torch.float32, device=device)
        weights = token_weights_N.to(torch.float32)
        # one set of [C, v] buffers for every chunk: the logits, their gradient and the loss's
        # own workspace are allocated (and page-faulted) once, not chunk after chunk
        width = weight_vH.shape[0]
        chunk = min(chunk_tokens, max(num_tokens, 1))
        # multi-threaded CPU, torch or compiled loss: every [C, v] buffer is vocab-major (a
        # [v, C] block), the layout of the products W h^T that run fast there
        # (transposed_gemms): no transposing copy of the logits (15 ms per 256 x 32,000 chunk,
        # as long as 8 of the torch loss's elementwise passes)
        vocab_major = impl in ("torch", "compiled") and transposed_gemms(device)
        ws = S.Workspace(chunk, vocab.valid_in_shard, device, vocab_major=vocab_major)
        buffers = _ChunkBuffers(chunk, width, hidden_NH, teacher, needs_grad, vocab_major)
        if vocab_major and buffers.grad is not None and buffers.grad.dtype == torch.float32:
            ws.lend("dot", buffers.grad)  # the row dot products' buffer (free until loss_grad)
        for start, end in VP._chunks(num_tokens, chunk_tokens):
            rows = slice(start, end)
            logits_Cv = buffers.logits(hidden_NH[rows], weight_vH)
            dense = None
            if isinstance(teacher, DenseTeacher):
                # row-major rows as they are: the first op that writes them into the
                # workspace transposes them (as a copy would, without its buffer)
                dense = teacher.logits[rows]
            elif isinstance(teacher, HiddenTeacher):
                dense = buffers.teacher_product(teacher, start, end)
            part = _slice_prep(sparse, start, end)
            labels_C = labels_N[rows] if labels_N is not None else None
            fwd = VP.loss_forward(
                logits_Cv,
                labels_C,
                dense,
                part,
                spec,
                vocab,
                tp_group,
                end - start,
                stats_log,
                metrics,
                impl,
                ws,
            )
            out["loss"][rows], out["lm"][rows], out["kd"][rows] = fwd.loss, fwd.lm, fwd.kd
            for name in ("teacher_entropy", "agree", "kept"):
                if fwd.aux[name] is not None:
                    out[name][rows] = fwd.aux[name].float()
            if not needs_grad:
                continue
            ce_weight, kd_weight = VP.grad_weights(fwd, spec, weights[rows])
            grad_Cv = buffers.grad_view(end - start)
            VP.loss_grad(
                grad_Cv,
                logits_Cv,
                labels_C,
                dense,
                part,
                fwd,
                ce_weight,
                kd_weight,
                spec,
                vocab,
                end - start,
                impl,
                ws,
                from_forward=True,
            )
            chunk_grad_hidden(grad_Cv, weight_vH, grad_hidden[rows], buffers.hidden_scratch)
            if grad_weight is not None:
                overwrite = start == 0 and not into_main
                _accumulate_wgrad(grad_weight, grad_Cv, hidden_NH[rows], wgrad_alpha, overwrite)
        if into_main:
            weight_vH.grad_added_to_main_grad = True  # megatron DDP: do not add .grad again
            ctx.main_grad_scale, ctx.weight = main_grad_scale, weight_vH
            ctx.save_for_backward(grad_hidden)
        else:
            ctx.main_grad_scale = None
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden_NH.dtype, weight_vH.dtype)
        weighted = (out["loss"] * weights).sum()
        for name in names:
            ctx.mark_non_differentiable(out[name])
        return (weighted,) + tuple(out[name] for name in names)

    @staticmethod
    def backward(ctx, grad_weighted, *unused):
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = grad_weighted.to(torch.float32)
        if ctx.main_grad_scale is not None:
            (grad_hidden,) = ctx.saved_tensors
            if not torch.isfinite(scale):  # a poisoned upstream: so must be the gradients
                ctx.weight.main_grad.add_(scale)  # (the step is then skipped, not trained on)
            elif float(scale) != ctx.main_grad_scale:
                raise RuntimeError(
                    f"fused output layer: the weight gradient went into main_grad scaled by "
                    f"{ctx.main_grad_scale}, but backward received {float(scale)}"
                )
            dw = _dummy_wgrad(ctx.weight)
            ctx.weight = None
        else:
            grad_hidden, grad_weight = ctx.saved_tensors
            dw = None if grad_weight is None else grad_weight.mul_(scale).to(weight_dtype)
        dh = None if grad_hidden is None else grad_hidden.mul_(scale.to(grad_hidden.dtype))
        return (dh, dw) + (None,) * 12


def _accumulate_wgrad(acc_vH, grad_Cv, hidden_CH, alpha: float, overwrite: bool) -> None:
    """acc += alpha * grad^T h in fp32, in place: no [v, H] temporary (one rounding per
    chunk); ``overwrite``: acc = alpha * grad^T h (beta = 0: acc's old contents, even NaN,
    are not read). Low-precision inputs: fp32 output of the GEMM on CUDA, else an fp32 copy
    of the chunk (O(chunk) memory)."""
    beta = 0.0 if overwrite else 1.0
    if grad_Cv.dtype == acc_vH.dtype:
        acc_vH.addmm_(grad_Cv.t(), hidden_CH, beta=beta, alpha=alpha)
        return
    if acc_vH.is_cuda:
        torch.addmm(
            acc_vH,
            grad_Cv.t(),
            hidden_CH,
            beta=beta,
            alpha=alpha,
            out_dtype=acc_vH.dtype,
            out=acc_vH,
        )
        return
    acc_vH.addmm_(grad_Cv.t().to(acc_vH.dtype), hidden_CH.to(acc_vH.dtype), beta=beta, alpha=alpha)


def _dummy_wgrad(weight: torch.Tensor) -> torch.Tensor:
    """What backward hands autograd for a weight whose gradient is already in main_grad:
    megatron DDP's hook runs on it (and skips adding it, grad_added_to_main_grad) - unless
    the weight is also used elsewhere on this stage (tied embeddings: zero_out_wgrad), where
    autograd sums it with the other use's gradient and the hook adds the sum: then zeros."""
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros_like(weight)
    return torch.empty_like(weight)


def _slice_prep(sparse: dict | None, start: int, end: int) -> dict | None:
    """Every per-token entry of a sparse teacher's prep, for tokens [start, end)."""
    if sparse is None:
        return None
    return {k: (v[start:end] if torch.is_tensor(v) else v) for k, v in sparse.items()}


def fused_linear_distillation_loss(
    hidden_NH: torch.Tensor,
    weight_vH: torch.Tensor,
    labels_N: torch.Tensor | None,
    token_weights_N: torch.Tensor,
    teacher,
    spec: LossSpec,
    vocab: VocabInfo,
    tp_group,
    impl: str = "torch",
    chunk_tokens: int | None = None,
    metrics: bool = True,
    sequence_parallel: bool = False,
    check_inputs: bool = True,
    collectives: list | None = None,
    grad_scale: float | None = None,
) -> dict:
    """{"weighted" (differentiable scalar sum_t w_t loss_t), "loss", "lm", "kd",
    "teacher_entropy", "agree", "kept" ([N], detached)} from hidden states.

    ``grad_scale``: the gradient that backward will receive for "weighted" (the loss scale,
    when the caller's schedule sums per-token losses). Given it, and a weight with megatron
    DDP's ``main_grad``, dL/dW goes straight into main_grad chunk by chunk (megatron's
    gradient-accumulation fusion): no [v, H] gradient is ever allocated (a dummy is returned,
    as megatron's own layers do). Backward raises if it receives another value.

    Collective over ``tp_group`` (per chunk one all-gather, JSD one all-reduce more; one
    all-reduce of dL/dh in backward unless ``sequence_parallel``: then ``hidden_NH`` is the
    output of ``gather_dim0`` and its backward does the reduction). ``weight_vH`` is this
    rank's [shard_size, H] vocab shard of the output weight.
    """
    from megatron_pd.loss.objective import announce, resolve_implementation
    from megatron_pd.loss.spec import check_inputs as validate_inputs

    impl = resolve_implementation(impl)
    announce(impl, "fused output layer")
    if hidden_NH.dim() != 2 or weight_vH.dim() != 2 or hidden_NH.shape[1] != weight_vH.shape[1]:
        raise ValueError(
            f"hidden states {tuple(hidden_NH.shape)} and output weight {tuple(weight_vH.shape)} "
            "must be [tokens, H] and [vocab shard, H]"
        )
    if tuple(token_weights_N.shape) != (hidden_NH.shape[0],):
        raise ValueError(
            f"token weights have shape {tuple(token_weights_N.shape)}, the hidden states "
            f"{hidden_NH.shape[0]} rows"
        )
    spec.check_teacher(DenseTeacher(None) if isinstance(teacher, HiddenTeacher) else teacher)
    probe = torch.empty(hidden_NH.shape[0], weight_vH.shape[0], device="meta")
    shape_teacher = teacher
    if isinstance(teacher, HiddenTeacher):
        if (
            teacher.weight.shape[0] != weight_vH.shape[0]
            or teacher.hidden.shape[0] != probe.shape[0]
        ):
            raise ValueError(
                f"hidden teacher {tuple(teacher.hidden.shape)} x {tuple(teacher.weight.shape)} "
                f"does not match the student's {tuple(probe.shape)} tokens x vocab shard"
            )
        shape_teacher = None
    validate_inputs(
        probe, labels_N, shape_teacher, spec, vocab, values=check_inputs, tp_group=tp_group
    )
    if impl == "reference":
        return _reference(
            hidden_NH,
            weight_vH,
            labels_N,
            token_weights_N,
            teacher,
            spec,
            vocab,
            tp_group,
            sequence_parallel,
        )
    chunk = chunk_tokens or default_fused_chunk(weight_vH.shape[0], hidden_NH.device.type)
    # each rank's gradient of h covers its vocab shard: summed over tp in backward - by the
    # sequence-parallel gather's reduce-scatter, else by an all-reduce
    hidden = hidden_NH if sequence_parallel else copy_to_group(hidden_NH, tp_group)
    log = collectives if collectives is not None else []
    # the gradient is made in the forward: only when one will be asked for
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight_vH.requires_grad)
    weighted, *values = FusedLinearDistillFunction.apply(
        hidden,
        weight_vH,
        labels_N,
        token_weights_N,
        teacher,
        spec,
        vocab,
        tp_group,
        chunk,
        metrics,
        impl,
        log,
        needs_grad,
        grad_scale if weight_vH.requires_grad and hasattr(weight_vH, "main_grad") else None,
    )
    names = ("loss", "lm", "kd", "teacher_entropy", "agree", "kept")
    return {"weighted": weighted, **dict(zip(names, values))}


def _reference(
    hidden_NH, weight_vH, labels_N, token_weights_N, teacher, spec, vocab, tp_group, gathered
):
    """The logits h W^T (full [N, v]) and the dense reference loss, differentiated by autograd."""
    from megatron_pd.loss.objective import distillation_loss

    logits = (hidden_NH if gathered else copy_to_group(hidden_NH, tp_group)) @ weight_vH.t()
    if isinstance(teacher, HiddenTeacher):
        teacher = DenseTeacher(teacher.hidden @ teacher.weight.t())
    out = distillation_loss(logits, labels_N, teacher, spec, vocab, tp_group, impl="reference")
    weighted = (out["loss"] * token_weights_N.to(out["loss"].dtype)).sum()
    return {"weighted": weighted, **{k: v.detach() for k, v in out.items()}}
