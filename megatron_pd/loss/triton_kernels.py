"""Triton kernels of the fused distillation loss: row statistics, JSD sums, gradient.

The same math as loss/stats.py and the torch path in loss/vocab_parallel.py, one program per
token row looping over the row's vocab shard in BLOCK-wide tiles:

* ``_row_stats_kernel``: ONE read of the student (and dense teacher) row. Sums relative to
  the row maximum are kept *online*: when a tile raises the running maximum from m to m',
  every accumulator is rescaled with d = m - m' by the same rules stats.merge_stats uses
  across ranks (e^d Z, e^d (D + d Z), e^{2d} Q, ...). Writes the [N, 2 + c] local rows.
* ``_jsd_sums_kernel``: the second read JSD needs, once the global normalisers are known.
* ``_grad_kernel``: one read of the student (and teacher) row, one write of the gradient in
  the logits' dtype.

The collectives between them stay in Python (vocab_parallel.py). Kernels run on GPU, and on
CPU under ``TRITON_INTERPRET=1`` (tests). Requesting this implementation where Triton cannot
run raises; it never falls back silently.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is absent
    HAVE_TRITON = False

NEG = -1.0e30
# Gradient kernel modes.
MODE_CE, MODE_KL, MODE_RKL, MODE_MSE_PROBS, MODE_MSE_LOGITS, MODE_JSD = 0, 1, 2, 3, 4, 5
MODE_SPARSE, MODE_SPARSE_MSE = 10, 11
_DENSE_MODES = {
    "soft_ce": MODE_KL,
    "forward_kl": MODE_KL,
    "reverse_kl": MODE_RKL,
    "mse_probs": MODE_MSE_PROBS,
    "mse_logits": MODE_MSE_LOGITS,
    "jsd": MODE_JSD,
}


def triton_available() -> tuple:
    """(usable, reason): Triton imports and has a device (CUDA, or the CPU interpreter)."""
    if not HAVE_TRITON:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "interpreter"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"


if HAVE_TRITON:

    @triton.jit
    def _zero():
        return tl.sum(tl.zeros([2], dtype=tl.float32), axis=0)

    @triton.jit
    def _row_stats_kernel(
        student_ptr,  # [N, >= n_cols] logits, any float dtype, read-only
        teacher_ptr,  # [N, >= n_cols] dense teacher logits, read-only (unused: HAS_TEACHER=0)
        labels_ptr,  # [N] int64 label minus shard start, read-only (unused: HAS_LABELS=0)
        out_ptr,  # [N, out_cols] fp32, written: (m_s, m_t, stats at the COL_* columns)
        n_cols,
        stride_s,  # row and column strides of the student and teacher (any view; Triton
        stride_s_col,  # specialises a stride of 1, so contiguous rows cost nothing extra)
        stride_t,
        stride_t_col,
        out_cols,
        shard_start,
        inv_tau_s,
        inv_tau,
        tau_s,
        HAS_TEACHER: tl.constexpr,
        HAS_LABELS: tl.constexpr,
        COL_Z_S: tl.constexpr,
        COL_D_S: tl.constexpr,
        COL_Q_SS: tl.constexpr,
        COL_Z_T: tl.constexpr,
        COL_B_T: tl.constexpr,
        COL_C_TS: tl.constexpr,
        COL_E_ST: tl.constexpr,
        COL_Q_TT: tl.constexpr,
        COL_X_ST: tl.constexpr,
        COL_SQ: tl.constexpr,
        COL_TARGET: tl.constexpr,
        COL_Z_1: tl.constexpr,
        COL_AMAX: tl.constexpr,
        COL_T_AT_AMAX: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        s_row = student_ptr + row * stride_s
        t_row = teacher_ptr + row * stride_t
        m_s = _zero() + NEG
        m_t = _zero() + NEG
        z_s = _zero()
        d_s = _zero()
        q_ss = _zero()
        z_t = _zero()
        b_t = _zero()
        c_ts = _zero()
        e_st = _zero()
        q_tt = _zero()
        x_st = _zero()
        sq = _zero()
        z_1 = _zero()
        best = _zero() + NEG
        best_idx = _zero()
        t_at_best = _zero()
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < n_cols
            x = tl.load(s_row + cols * stride_s_col, mask=valid, other=0.0).to(tl.float32)
            x = x * inv_tau_s
            x = tl.where(valid, x, NEG)
            new_m_s = tl.maximum(m_s, tl.max(x, axis=0))
            delta_s = m_s - new_m_s
            f_s = tl.exp(delta_s)
            xs = x - new_m_s
            es = tl.where(valid, tl.exp(xs), 0.0)
            xs = tl.where(valid, xs, 0.0)
            if COL_AMAX >= 0:
                block_best = tl.max(x, axis=0)
                block_idx = tl.argmax(x, axis=0)
                better = block_best > best
                best_idx = tl.where(better, (start + block_idx).to(tl.float32), best_idx)
                best = tl.maximum(best, block_best)
            # Rescale-then-add, accumulators that need the old Z first.
            # e * x with 0 * -inf = 0: a -inf logit has e = 0 and adds nothing
            d_s = f_s * (d_s + delta_s * z_s) + tl.sum(tl.where(es > 0, es * xs, 0.0), axis=0)
            if COL_Z_1 >= 0:
                z_1 = z_1 * tl.exp(tau_s * delta_s) + tl.sum(
                    tl.where(valid, tl.exp(tau_s * xs), 0.0), axis=0
                )
            q_ss = q_ss * f_s * f_s + tl.sum(es * es, axis=0)
            if HAS_TEACHER:
                y = tl.load(t_row + cols * stride_t_col, mask=valid, other=0.0).to(tl.float32)
                y = y * inv_tau
                y = tl.where(valid, y, NEG)
                new_m_t = tl.maximum(m_t, tl.max(y, axis=0))
                delta_t = m_t - new_m_t
                f_t = tl.exp(delta_t)
                yt = y - new_m_t
                et = tl.where(valid, tl.exp(yt), 0.0)
                yt = tl.where(valid, yt, 0.0)
                b_t = f_t * (b_t + delta_t * z_t) + tl.sum(tl.where(et > 0, et * yt, 0.0), axis=0)
                c_ts = f_t * (c_ts + delta_s * z_t) + tl.sum(et * xs, axis=0)
                e_st = f_s * (e_st + delta_t * z_s) + tl.sum(es * yt, axis=0)
                q_tt = q_tt * f_t * f_t + tl.sum(et * et, axis=0)
                x_st = x_st * f_s * f_t + tl.sum(es * et, axis=0)
                diff = tl.where(valid, x - y, 0.0)
                sq = sq + tl.sum(diff * diff, axis=0)
                z_t = z_t * f_t + tl.sum(et, axis=0)
                if COL_T_AT_AMAX >= 0:
                    y_here = tl.sum(tl.where(cols == best_idx.to(tl.int32), y, 0.0), axis=0)
                    in_block = (best_idx >= start) & (best_idx < start + BLOCK)
                    t_at_best = tl.where(in_block, y_here, t_at_best)
                m_t = new_m_t
            z_s = z_s * f_s + tl.sum(es, axis=0)
            m_s = new_m_s
        out_row = out_ptr + row * out_cols
        tl.store(out_row, m_s)
        tl.store(out_row + 1, m_t)
        if COL_Z_S >= 0:
            tl.store(out_row + COL_Z_S, z_s)
        if COL_D_S >= 0:
            tl.store(out_row + COL_D_S, d_s)
        if COL_Q_SS >= 0:
            tl.store(out_row + COL_Q_SS, q_ss)
        if COL_Z_T >= 0:
            tl.store(out_row + COL_Z_T, z_t)
        if COL_B_T >= 0:
            tl.store(out_row + COL_B_T, b_t)
        if COL_C_TS >= 0:
            tl.store(out_row + COL_C_TS, c_ts)
        if COL_E_ST >= 0:
            tl.store(out_row + COL_E_ST, e_st)
        if COL_Q_TT >= 0:
            tl.store(out_row + COL_Q_TT, q_tt)
        if COL_X_ST >= 0:
            tl.store(out_row + COL_X_ST, x_st)
        if COL_SQ >= 0:
            tl.store(out_row + COL_SQ, sq)
        if COL_Z_1 >= 0:
            tl.store(out_row + COL_Z_1, z_1)
        if COL_AMAX >= 0:
            tl.store(out_row + COL_AMAX, best_idx + shard_start)
        if COL_T_AT_AMAX >= 0:
            tl.store(out_row + COL_T_AT_AMAX, t_at_best)
        if COL_TARGET >= 0:
            label = tl.load(labels_ptr + row)
            owned = (label >= 0) & (label < n_cols)
            picked = tl.load(s_row + tl.where(owned, label, 0) * stride_s_col).to(tl.float32)
            tl.store(out_row + COL_TARGET, tl.where(owned, picked, 0.0))

    @triton.jit
    def _jsd_sums_kernel(
        student_ptr,  # [N, >= n_cols] logits, read-only
        teacher_ptr,  # [N, >= n_cols] dense teacher logits, read-only
        lse_s_ptr,  # [N] fp32 global student log-normaliser (of s / tau_s), read-only
        lse_t_ptr,  # [N] fp32 global teacher log-normaliser (of t / tau), read-only
        out_ptr,  # [N, 2] fp32, written: (sum JSD terms, sum P * dJSD/dP)
        n_cols,
        stride_s,
        stride_s_col,
        stride_t,
        stride_t_col,
        inv_tau_s,
        inv_tau,
        beta,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        lse_s = tl.load(lse_s_ptr + row)
        lse_t = tl.load(lse_t_ptr + row)
        value = _zero()
        weighted = _zero()
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < n_cols
            log_p = (
                tl.load(
                    student_ptr + row * stride_s + cols * stride_s_col, mask=valid, other=0.0
                ).to(tl.float32)
                * inv_tau_s
                - lse_s
            )
            log_t = (
                tl.load(
                    teacher_ptr + row * stride_t + cols * stride_t_col, mask=valid, other=0.0
                ).to(tl.float32)
                * inv_tau
                - lse_t
            )
            p = tl.where(valid, tl.exp(log_p), 0.0)
            t = tl.where(valid, tl.exp(log_t), 0.0)
            mix = beta * t + (1.0 - beta) * p
            log_mix = tl.log(tl.maximum(mix, 1.1754943508222875e-38))  # FLT_MIN, see _grad_kernel
            term_t = tl.where(t > 0, t * (log_t - log_mix), 0.0)
            term_p = tl.where(p > 0, p * (log_p - log_mix), 0.0)
            value += tl.sum(beta * term_t + (1.0 - beta) * term_p, axis=0)
            weighted += tl.sum((1.0 - beta) * term_p, axis=0)
        tl.store(out_ptr + row * 2, value)
        tl.store(out_ptr + row * 2 + 1, weighted)

    @triton.jit
    def _grad_kernel(
        student_ptr,  # [N, >= n_cols] logits, read-only
        teacher_ptr,  # [N, >= n_cols] dense teacher logits, read-only (MODE_CE/sparse: unused)
        labels_ptr,  # [N] int64 label minus shard start, read-only (unused: HAS_LABELS=0)
        rows_ptr,  # [N, 8] fp32 per-token scalars, read-only: lse_s, lse_t, lse_1, W, a,
        #           ce_weight, kd_weight, unused
        grad_ptr,  # [N, >= n_cols] gradient in the logits' dtype, written (valid columns)
        n_cols,
        stride_s,
        stride_s_col,
        stride_t,
        stride_t_col,
        stride_g,
        stride_g_col,
        inv_tau_s,
        inv_tau,
        beta,
        mse_scale,
        MODE: tl.constexpr,
        HAS_LABELS: tl.constexpr,
        SHARED_CE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        scalars = rows_ptr + row * 8
        lse_s = tl.load(scalars)
        lse_t = tl.load(scalars + 1)
        lse_1 = tl.load(scalars + 2)
        w_mean = tl.load(scalars + 3)
        a_out = tl.load(scalars + 4)
        ce_w = tl.load(scalars + 5)
        kd_w = tl.load(scalars + 6)
        label = -1
        if HAS_LABELS:
            label = tl.load(labels_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < n_cols
            raw = tl.load(student_ptr + row * stride_s + cols * stride_s_col, mask=valid, other=0.0)
            raw = raw.to(tl.float32)
            x = raw * inv_tau_s
            p = tl.exp(x - lse_s)
            if MODE == MODE_CE:
                g = p * ce_w
            else:
                ce_here = 0.0
                if SHARED_CE:
                    ce_here = ce_w
                if MODE == MODE_SPARSE:
                    # (p * (a - W)) * kd_w: a = -r / G can be huge, the product stays finite
                    g = (p * (a_out - w_mean)) * kd_w + p * ce_here
                elif MODE == MODE_SPARSE_MSE:
                    g = p * (kd_w * (2.0 * p - w_mean) + ce_here)
                else:
                    y = (
                        tl.load(
                            teacher_ptr + row * stride_t + cols * stride_t_col,
                            mask=valid,
                            other=0.0,
                        ).to(tl.float32)
                        * inv_tau
                    )
                    if MODE == MODE_MSE_LOGITS:
                        g = kd_w * mse_scale * (x - y) + p * ce_here
                    else:
                        t = tl.exp(y - lse_t)
                        if MODE == MODE_KL:
                            g = p * (kd_w + ce_here) - kd_w * t
                        elif MODE == MODE_RKL:
                            g = p * (kd_w * ((x - lse_s) - (y - lse_t) - w_mean) + ce_here)
                        elif MODE == MODE_MSE_PROBS:
                            g = p * (kd_w * (2.0 * (p - t) - w_mean) + ce_here)
                        else:  # MODE_JSD
                            mix = beta * t + (1.0 - beta) * p
                            # Floor at FLT_MIN (the smallest normal fp32), not 1e-38: a subnormal
                            # constant zeroed this whole gradient in Triton 3.7.1's interpreter
                            # (bf16 logits; torch 2.13's CUDA wheels pin that Triton), and GPUs
                            # may flush it to 0, giving log(0).
                            floor = 1.1754943508222875e-38
                            w = (1.0 - beta) * ((x - lse_s) - tl.log(tl.maximum(mix, floor)))
                            g = p * (kd_w * (w - w_mean) + ce_here)
                if HAS_LABELS and not SHARED_CE:
                    g += ce_w * tl.exp(raw - lse_1)
            if HAS_LABELS:
                g = tl.where(cols == label, g - ce_w, g)
            tl.store(
                grad_ptr + row * stride_g + cols * stride_g_col,
                g.to(grad_ptr.dtype.element_ty),
                mask=valid,
            )


_STAT_COLUMNS = (
    "z_s",
    "d_s",
    "q_ss",
    "z_t",
    "b_t",
    "c_ts",
    "e_st",
    "q_tt",
    "x_st",
    "sq",
    "target",
    "z_1",
    "amax_s",
    "t_at_amax",
)


MAX_BLOCK = 4096  # columns per tile; tests lower it so rows span several tiles


def _block(n_cols: int) -> int:
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(max(n_cols, 1))))


def row_stats(
    student_Nv, teacher_Nv, labels_local_N, names: list, spec, tau_s: float, shard_start: int
) -> torch.Tensor:
    """Local rows [N, 2 + len(names)] of the dense (student/teacher) statistics.

    Sparse-teacher sums (k_*) are left at 0 here; the caller adds them from the kept entries.
    """
    num, n_cols = student_Nv.shape[0], student_Nv.shape[1]
    _check_same_shape(student_Nv, teacher_Nv)
    out = torch.zeros(num, 2 + len(names), device=student_Nv.device)
    if n_cols == 0:
        out[:, :2] = NEG
        if "amax_s" in names:
            out[:, 2 + names.index("amax_s")] = -1.0
        return out
    columns = {
        f"COL_{n.upper().replace('AMAX_S', 'AMAX')}": (2 + names.index(n) if n in names else -1)
        for n in _STAT_COLUMNS
    }
    teacher = teacher_Nv if teacher_Nv is not None else student_Nv
    labels = (
        labels_local_N
        if labels_local_N is not None
        else torch.zeros(num, dtype=torch.int64, device=student_Nv.device)
    )
    _row_stats_kernel[(num,)](
        student_Nv,
        teacher,
        labels.long(),
        out,
        n_cols,
        student_Nv.stride(0),
        student_Nv.stride(1),
        teacher.stride(0),
        teacher.stride(1),
        out.shape[1],
        shard_start,
        1.0 / tau_s,
        1.0 / spec.tau,
        tau_s,
        HAS_TEACHER=teacher_Nv is not None,
        HAS_LABELS=labels_local_N is not None,
        BLOCK=_block(n_cols),
        **columns,
    )
    return out


def _check_same_shape(student_Nv, other_Nv) -> None:
    """The kernels read the teacher (and write the gradient) with the student's row width."""
    if other_Nv is not None and other_Nv.shape != student_Nv.shape:
        raise ValueError(
            f"teacher/gradient {tuple(other_Nv.shape)} and student {tuple(student_Nv.shape)} "
            "must have the same shape for the Triton kernels"
        )


def jsd_sums(student_Nv, teacher_Nv, lse_s, lse_t, spec, tau_s: float) -> torch.Tensor:
    num, n_cols = student_Nv.shape
    _check_same_shape(student_Nv, teacher_Nv)
    out = torch.zeros(num, 2, device=student_Nv.device)
    if n_cols == 0:
        return out
    _jsd_sums_kernel[(num,)](
        student_Nv,
        teacher_Nv,
        lse_s.float().contiguous(),
        lse_t.float().contiguous(),
        out,
        n_cols,
        student_Nv.stride(0),
        student_Nv.stride(1),
        teacher_Nv.stride(0),
        teacher_Nv.stride(1),
        1.0 / tau_s,
        1.0 / spec.tau,
        spec.jsd_beta,
        BLOCK=_block(n_cols),
    )
    return out


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
    num, n_cols = student_Nv.shape
    _check_same_shape(student_Nv, teacher_Nv)
    _check_same_shape(student_Nv, grad_Nv)
    if n_cols == 0 or num == 0:
        return
    tau_s = spec.tau_student if kind else 1.0
    if kind is None:
        mode = MODE_CE
    elif kind == "dense":
        mode = _DENSE_MODES[spec.kind]
    else:
        mode = MODE_SPARSE_MSE if (spec.kind == "mse_probs" and not spec.tail) else MODE_SPARSE
    zero = torch.zeros(num, device=student_Nv.device)
    scalars = (
        torch.stack(
            [
                per_token.get("lse_s", zero),
                per_token.get("lse_t", zero),
                per_token.get("lse_1", per_token.get("lse_s", zero)),
                per_token.get("W", zero),
                per_token["a"] if per_token.get("a") is not None else zero,
                ce_weight.float(),
                kd_weight.float(),
                zero,
            ],
            dim=-1,
        )
        .float()
        .contiguous()
    )
    teacher = teacher_Nv if teacher_Nv is not None else student_Nv
    has_labels = labels_local_N is not None
    labels = (
        labels_local_N.long()
        if has_labels
        else torch.zeros(num, dtype=torch.int64, device=student_Nv.device)
    )
    _grad_kernel[(num,)](
        student_Nv,
        teacher,
        labels,
        scalars,
        grad_Nv,
        n_cols,
        student_Nv.stride(0),
        student_Nv.stride(1),
        teacher.stride(0),
        teacher.stride(1),
        grad_Nv.stride(0),
        grad_Nv.stride(1),
        1.0 / tau_s,
        1.0 / spec.tau,
        spec.jsd_beta,
        2.0 / true_vocab,
        MODE=mode,
        HAS_LABELS=has_labels,
        SHARED_CE=has_labels and tau_s == 1.0 and kind is not None,
        BLOCK=_block(n_cols),
    )
