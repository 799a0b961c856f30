"""The fused loss's row kernels as torch code compiled by inductor: the ``compiled`` implementation.

Same contract as loss/triton_kernels.py (``row_stats``, ``jsd_sums``, ``grad_rows``; the
collectives and the sparse teacher's kept entries stay in vocab_parallel.py), written as plain
tensor expressions that ``torch.compile`` fuses into a few loops over each [N, v] chunk: on CPU
generated C++ (a C++ compiler is needed at run time), on CUDA generated Triton. The torch path
makes every elementwise step its own pass over memory (about 17 per 256 x 32,000 chunk of a
forward-KL + CE loss with a dense teacher); here the statistics are one read of the student and
teacher rows after their maxima, and the gradient one read and one write. The math is the torch
path's two-pass form (maxima first, then sums relative to them), not the Triton kernels' online
rescaling.

Inputs may be any strided [N, v] views (the fused output layer's vocab-major blocks included);
inductor specialises on the layout. Each static configuration (loss kind, teacher kind, labels,
metrics, dtype, layout) is one compiled graph, with symbolic sizes (the shorter last chunk and
another shard width reuse it); tau, beta and the shard start are inputs, not constants.
Requesting this implementation where it cannot compile raises; it never falls back to another
implementation (under a Python dispatch mode the same kernel code runs uncompiled: _run).
"""

from __future__ import annotations

import functools
import os
import shutil

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from megatron_pd.loss import stats as S

NEG = -1.0e30
# distinct static configurations one process may compile per kernel (dynamo's default of 8 is
# reached by a test sweeping every loss kind; past the limit a fullgraph compile raises)
RECOMPILE_LIMIT = 64
FLT_MIN = 1.1754943508222875e-38  # the floor of the JSD mixture's log (as the Triton kernel)
# rows per kernel call: at most this many [rows x v] elements. Inductor keeps one [rows, v]
# fp32 intermediate in the statistics kernel (the student's exponentials, which two loops
# read), so a call over all of a long logits tensor would hold [N, v] of them: 2^23 elements
# (32 MB) is the fused output layer's 256-row chunk at v = 32,768, in one call.
BLOCK_ELEMENTS = 1 << 23

_DENSE_STATS = (
    "z_s",
    "d_s",
    "q_ss",
    "target",
    "z_1",
    "amax_s",
    "z_t",
    "b_t",
    "c_ts",
    "e_st",
    "q_tt",
    "x_st",
    "sq",
    "t_at_amax",
)


@functools.cache
def compiled_available(device_type: str) -> tuple:
    """(usable, reason): inductor can generate code for this device type here."""
    try:
        import torch._inductor.config as inductor_config
    except ImportError as exc:  # pragma: no cover - torch without inductor
        return False, f"torch inductor cannot be imported ({exc})"
    if device_type == "cuda":
        from megatron_pd.loss.triton_kernels import HAVE_TRITON

        return (True, "cuda") if HAVE_TRITON else (False, "triton is not installed")
    if device_type != "cpu":
        return False, f"no inductor backend for device type {device_type!r}"
    compiler = os.environ.get("CXX") or inductor_config.cpp.cxx[-1] or "g++"
    if shutil.which(compiler) is None:
        return False, f"no C++ compiler {compiler!r} on PATH (inductor's CPU code needs one)"
    return True, compiler


def check_available(device: torch.device) -> None:
    usable, why = compiled_available(device.type)
    if not usable:
        raise RuntimeError(f"loss implementation 'compiled' cannot run here: {why}")


def _blocks(num: int, width: int):
    """Row slices of at most BLOCK_ELEMENTS elements (at least one row each)."""
    rows = max(1, BLOCK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + rows, num)) for start in range(0, num, rows)]


def _rows(x, block: slice):
    return None if x is None else x[block]


def _run(kernel, *args, **static):
    """Call a kernel compiled; a compiler failure becomes an error naming this implementation.

    Under a Python dispatch mode (FlopCounterMode, a collective counter, an op tracer) dynamo
    cannot compile, and the mode wants to see every op anyway: the kernel's own torch code then
    runs op by op - the same expressions, with [rows, v] temporaries."""
    if _get_current_dispatch_mode() is not None:
        return kernel(*args, **static)
    import torch._dynamo

    compiled = _compiled(kernel)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        try:
            return compiled(*args, **static)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise RuntimeError(
                f"loss implementation 'compiled' cannot run here: inductor failed ({exc})"
            ) from exc


def _stats_kernel(student, teacher, labels, inv_tau_s, inv_tau, tau_s, shard_start, *, names):
    """[N, 2 + len(names)]: (m_s, m_t, names...) of the scaled rows; k_* / z_out left 0."""
    x = student.float() * inv_tau_s
    width = x.shape[1]
    m_s = x.amax(-1).clamp_min(NEG)  # a row of -inf logits has maximum NEG
    xs = x - m_s[:, None]
    es = torch.exp(xs)
    zero = torch.zeros_like(m_s)
    out = {"z_s": es.sum(-1)}
    if "d_s" in names:  # e * x with 0 * -inf = 0: a -inf logit adds nothing
        out["d_s"] = torch.where(es > 0, es * xs, 0.0).sum(-1)
    if "q_ss" in names:
        out["q_ss"] = (es * es).sum(-1)
    if "target" in names:
        owned = (labels >= 0) & (labels < width)
        picked = student.gather(1, labels.clamp(0, width - 1)[:, None])[:, 0].float()
        out["target"] = torch.where(owned, picked, zero)
    if "z_1" in names:  # the hard-label softmax at tau = 1: its max is tau_s * m_s
        out["z_1"] = torch.exp(xs * tau_s).sum(-1)
    if "amax_s" in names:
        amax = x.argmax(-1)
        out["amax_s"] = (amax + shard_start).float()
    m_t = torch.full_like(m_s, NEG)
    if teacher is not None:
        y = teacher.float() * inv_tau
        m_t = y.amax(-1).clamp_min(NEG)
        yt = y - m_t[:, None]
        et = torch.exp(yt)
        out["z_t"] = et.sum(-1)
        if "b_t" in names:
            out["b_t"] = torch.where(et > 0, et * yt, 0.0).sum(-1)
        if "c_ts" in names:
            out["c_ts"] = (et * xs).sum(-1)
        if "e_st" in names:
            out["e_st"] = (es * yt).sum(-1)
        if "q_tt" in names:
            out["q_tt"] = (et * et).sum(-1)
        if "x_st" in names:
            out["x_st"] = (es * et).sum(-1)
        if "sq" in names:
            out["sq"] = ((x - y) * (x - y)).sum(-1)
        if "t_at_amax" in names:
            out["t_at_amax"] = y.gather(1, amax[:, None])[:, 0]
    return torch.stack([m_s, m_t] + [out.get(n, zero) for n in names], dim=-1)


def _jsd_kernel(student, teacher, lse_s, lse_t, inv_tau_s, inv_tau, beta):
    """[N, 2]: per row (sum of the JSD terms, sum of P * dJSD/dP), dense teacher."""
    P = torch.exp(student.float() * inv_tau_s - lse_s[:, None])
    T = torch.exp(teacher.float() * inv_tau - lse_t[:, None])
    value, weighted = S.jsd_terms(P, T, beta)
    return torch.stack([value.sum(-1), weighted.sum(-1)], dim=-1)


def _grad_kernel(
    student,
    teacher,
    labels,
    lse_s,
    lse_t,
    lse_1,
    w_mean,
    a_out,
    ce_w,
    kd_w,
    out,
    inv_tau_s,
    inv_tau,
    beta,
    mse_scale,
    *,
    mode,
    shared_ce,
):
    """Write the gradient of the valid columns into ``out`` (its dtype): the Triton
    _grad_kernel's formulas, mode by mode (vocab_parallel._grad_chunk's, per element)."""
    raw = student.float()
    x = raw * inv_tau_s
    p = torch.exp(x - lse_s[:, None])
    ce_c, kd_c = ce_w[:, None], kd_w[:, None]
    ce_here = ce_c if shared_ce else 0.0
    if mode == "ce":
        g = p * ce_c
    elif mode == "sparse":  # (p * (a - W)) * kd_w: a = -r / G can be huge, the product is not
        g = (p * (a_out - w_mean)[:, None]) * kd_c + p * ce_here
    elif mode == "sparse_mse":
        g = p * (kd_c * (2.0 * p - w_mean[:, None]) + ce_here)
    else:
        y = teacher.float() * inv_tau
        if mode == "mse_logits":
            g = kd_c * mse_scale * (x - y) + p * ce_here
        else:
            t = torch.exp(y - lse_t[:, None])
            if mode == "kl":
                g = p * (kd_c + ce_here) - kd_c * t
            elif mode == "reverse_kl":
                g = p * (kd_c * ((x - lse_s[:, None]) - (y - lse_t[:, None]) - w_mean[:, None]))
                g = g + p * ce_here
            elif mode == "mse_probs":
                g = p * (kd_c * (2.0 * (p - t) - w_mean[:, None]) + ce_here)
            else:  # jsd
                mix = beta * t + (1.0 - beta) * p
                w = (1.0 - beta) * ((x - lse_s[:, None]) - torch.log(mix.clamp_min(FLT_MIN)))
                g = p * (kd_c * (w - w_mean[:, None]) + ce_here)
    if labels is not None and mode != "ce" and not shared_ce:
        g = g + ce_c * torch.exp(raw - lse_1[:, None])
    if labels is not None:
        cols = torch.arange(x.shape[1], device=x.device)
        g = torch.where(cols[None, :] == labels[:, None], g - ce_c, g)
    out.copy_(g)


@functools.cache
def _compiled(kernel):
    """The compiled form of a kernel, made on first use (importing this module compiles
    nothing). Sizes are dynamic from the start: one graph per static configuration, not one
    more for the shorter last chunk."""
    return torch.compile(kernel, fullgraph=True, dynamic=True)


_DENSE_MODES = {
    "soft_ce": "kl",
    "forward_kl": "kl",
    "reverse_kl": "reverse_kl",
    "mse_probs": "mse_probs",
    "mse_logits": "mse_logits",
    "jsd": "jsd",
}


def row_stats(
    student_Nv, teacher_Nv, labels_local_N, names: list, spec, tau_s: float, shard_start: int
) -> torch.Tensor:
    """Local rows [N, 2 + len(names)] of the dense (student/teacher) statistics.

    Sparse-teacher sums (k_*, z_out) are left at 0 here; the caller adds them from the kept
    entries."""
    num, width = student_Nv.shape
    if teacher_Nv is not None and teacher_Nv.shape != student_Nv.shape:
        raise ValueError(
            f"teacher {tuple(teacher_Nv.shape)} and student {tuple(student_Nv.shape)} "
            "must have the same shape"
        )
    if width == 0 or num == 0:
        out = torch.zeros(num, 2 + len(names), device=student_Nv.device)
        out[:, :2] = NEG
        if "amax_s" in names:
            out[:, 2 + names.index("amax_s")] = -1.0
        return out
    check_available(student_Nv.device)
    wanted = tuple(n if n in _DENSE_STATS else "" for n in names)
    if labels_local_N is None and "target" in wanted:
        raise ValueError("row_stats: the 'target' statistic needs labels")
    parts = [
        _run(
            _stats_kernel,
            student_Nv[rows],
            _rows(teacher_Nv, rows),
            _rows(labels_local_N, rows),
            1.0 / tau_s,
            1.0 / spec.tau,
            tau_s,
            shard_start,
            names=wanted,
        )
        for rows in _blocks(num, width)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def jsd_sums(student_Nv, teacher_Nv, lse_s, lse_t, spec, tau_s: float) -> torch.Tensor:
    """[N, 2]: the JSD terms' row sums and their P-weighted derivative mass (dense teacher)."""
    num, width = student_Nv.shape
    if width == 0 or num == 0:
        return torch.zeros(num, 2, device=student_Nv.device)
    check_available(student_Nv.device)
    parts = [
        _run(
            _jsd_kernel,
            student_Nv[rows],
            teacher_Nv[rows],
            lse_s[rows].float(),
            lse_t[rows].float(),
            1.0 / tau_s,
            1.0 / spec.tau,
            spec.jsd_beta,
        )
        for rows in _blocks(num, width)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def grad_rows(
    student_Nv,
    teacher_Nv,
    labels_local_N,
    per_token: dict,
    ce_weight,
    kd_weight,
    spec,
    kind,
    grad_Nv,
    true_vocab: int,
) -> None:
    """Write the gradient of the valid columns into ``grad_Nv`` (the dense/generic part; the
    caller adds the kept entries' correction of a sparse teacher)."""
    num, width = student_Nv.shape
    if grad_Nv.shape != student_Nv.shape:
        raise ValueError(
            f"gradient {tuple(grad_Nv.shape)} and student {tuple(student_Nv.shape)} "
            "must have the same shape"
        )
    if width == 0 or num == 0:
        return
    check_available(student_Nv.device)
    tau_s = spec.tau_student if kind else 1.0
    if kind is None:
        mode = "ce"
    elif kind == "dense":
        mode = _DENSE_MODES[spec.kind]
    else:
        mode = "sparse_mse" if (spec.kind == "mse_probs" and not spec.tail) else "sparse"
    zero = torch.zeros(num, device=student_Nv.device)
    lse_s = per_token.get("lse_s", zero)
    a_out = per_token.get("a")
    lse_1 = per_token.get("lse_1", lse_s)
    scalars = [
        lse_s,
        per_token.get("lse_t", zero),
        lse_1,
        per_token.get("W", zero),
        a_out if a_out is not None else zero,
        ce_weight.float(),
        kd_weight.float(),
    ]
    teacher = teacher_Nv if mode not in ("ce", "sparse", "sparse_mse") else None
    for rows in _blocks(num, width):
        _run(
            _grad_kernel,
            student_Nv[rows],
            _rows(teacher, rows),
            _rows(labels_local_N, rows),
            *[x[rows] for x in scalars],
            grad_Nv[rows],
            1.0 / tau_s,
            1.0 / spec.tau,
            spec.jsd_beta,
            2.0 / true_vocab,
            mode=mode,
            shared_ce=labels_local_N is not None and tau_s == 1.0 and kind is not None,
        )
