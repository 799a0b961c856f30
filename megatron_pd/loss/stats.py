"""Per-token statistics of the fused vocab-parallel loss: local sums, their merge, the losses.

Every distillation loss of loss/spec.py is a function of a few per-token sums over the
vocabulary. Each rank computes them over its vocab shard *relative to its own maxima*
(one read of the logits); the ranks' rows are then all-gathered (one collective of
[TP, N, c] floats, a few KB per token-batch) and merged exactly by rescaling to the global
maxima. With m_r a rank's local maximum and m the global one, d = m_r - m <= 0:

    sum e^{x-m}           = e^d * sum_r e^{x-m_r}
    sum e^{x-m} (x - m)   = e^d * (sum_r e^{x-m_r} (x - m_r) + d * sum_r e^{x-m_r})
    sum e^{2(x-m)}        = e^{2d} * sum_r e^{2(x-m_r)}

so no MAX-then-SUM round trip is needed. JSD alone needs the global normalisers before its
log-mixture terms, hence a second pass and one SUM all-reduce. This module holds the math
(local sums for a chunk of tokens, merge, per-token losses and the scalars the backward pass
needs); loss/vocab_parallel.py runs it chunk by chunk with the collectives, and the Triton
kernels compute the same local sums on GPU.

Notation (see loss/spec.py): s~ = s / tau_s and t~ = t / tau over the true vocabulary;
P = softmax(s~), T = softmax(t~) (or the kept sparse entries). Shape legend: C tokens of a
chunk, N all tokens, v valid columns of this rank's shard, K kept entries.
"""

from __future__ import annotations

import math

import torch

from megatron_pd.loss.spec import LossSpec

NEG = -1.0e30  # the "maximum" of a shard with no valid column: e^{NEG - m} = 0, NEG * 0 = 0

# How each statistic rescales when merged: the maxima it is relative to, and its kind.
#   "exp_s": e^{d_s}, "exp_t": e^{d_t}, "exp_2s": e^{2 d_s}, "exp_2t": e^{2 d_t},
#   "exp_st": e^{d_s + d_t}, "exp_1": e^{tau_s d_s} (tau=1 student), "plain": no rescale,
#   ("lin_s", base): x + d_s * base (linear term relative to m_s),
#   ("xlin_s", base): e^{d_s} (x + d_s * base), ("xlin_t", base), ("xlin_st", base): e^{d_s}
#   (x + d_t * base), ("xlin_ts", base): e^{d_t} (x + d_s * base).
RULES = {
    "z_s": "exp_s",
    "d_s": ("xlin_s", "z_s"),
    "e_st": ("xlin_st", "z_s"),
    "q_ss": "exp_2s",
    "z_t": "exp_t",
    "b_t": ("xlin_t", "z_t"),
    "c_ts": ("xlin_ts", "z_t"),
    "q_tt": "exp_2t",
    "x_st": "exp_st",
    "z_1": "exp_1",
    "target": "plain",
    "sq": "plain",
    "k_z": "exp_s",
    "k_zs": ("xlin_s", "k_z"),
    "k_zlogT": "exp_s",
    "k_qs": ("lin_s", "k_t"),
    "k_t": "plain",
    "k_zz": "exp_2s",
    "k_zt": "exp_s",
    "amax_s": "argmax",
    "t_at_amax": "argmax",
    "k_sbest": "max_abs_s",
    "z_out": "exp_s",
}


def needed_stats(
    spec: LossSpec, teacher_kind: str | None, with_labels: bool, metrics: bool = True
) -> list:
    """Names of the summed statistics this loss needs ("m_s"/"m_t" maxima come first).

    ``metrics`` adds what the teacher entropy and the top-1 agreement need.
    """
    names = ["z_s"]
    if with_labels:
        names += ["target"] + (["z_1"] if spec.tau_student != 1.0 and teacher_kind else [])
    if teacher_kind == "dense":
        names += ["z_t"]
        if metrics or spec.kind == "forward_kl":
            names += ["b_t"]
        if metrics:
            names += ["amax_s", "t_at_amax"]
        names += {
            "soft_ce": ["c_ts"],
            "forward_kl": ["c_ts"],
            "reverse_kl": ["d_s", "e_st"],
            "mse_probs": ["q_ss", "q_tt", "x_st"],
            "mse_logits": ["sq"],
            "jsd": [],
        }[spec.kind]
    elif teacher_kind == "sparse":
        # top-1 agreement from the student logit at the teacher's best kept entry: no argmax
        # over the vocabulary (the most expensive reduction on CPU)
        names += ["k_z"] + (["k_sbest"] if metrics else [])
        if spec.tail:  # the student's mass outside the kept set, summed directly (see G)
            names += ["z_out"]
        names += {
            "soft_ce": ["k_qs", "k_t"],
            "forward_kl": ["k_qs", "k_t"],
            "reverse_kl": ["k_zs", "k_zlogT"],
            "mse_probs": ["q_ss", "k_zz", "k_zt"],
            "jsd": [],
        }[spec.kind]
    return names


def has_second_pass(spec: LossSpec, teacher_kind: str | None) -> bool:
    return teacher_kind is not None and spec.kind == "jsd"


# ---------------------------------------------------------------------------- local (per rank)
class Workspace:
    """Reusable [C, v] fp32 buffers for the chunk loops (allocated once per call, so big
    temporaries are not re-allocated - and page-faulted - chunk after chunk).

    ``vocab_major``: every buffer is a [C, v] view of a [v, C] block (strides (1, C)), the
    layout the fused output layer's chunks have on multi-threaded CPU (fused_linear.py); all
    operands of an op then share one layout, and no op transposes.

    ``fresh`` records what chunk_local_stats left in the buffers for the gradient of the same
    chunk (the fused output layer computes it at once): name -> the per-row local maxima the
    values are relative to ("exp_s": exp(s~ - m_s), "exp_t": exp(t~ - m_t)), or None ("s",
    "t": the scaled logits s~ and t~). Each chunk_local_stats call starts it afresh.
    """

    def __init__(self, rows: int, cols: int, device, vocab_major: bool = False):
        self.rows, self.cols, self.device = rows, cols, device
        self.vocab_major = vocab_major
        self._buffers = {}
        self.fresh = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = torch.empty(self.rows * self.cols, device=self.device)
        return chunk_view(buffer, rows, self.cols, self.vocab_major)

    def lend(self, name: str, flat: torch.Tensor) -> None:
        """Use ``flat`` (fp32, at least rows x cols elements, free whenever this workspace's
        user runs) as the buffer ``name``: a caller's idle buffer instead of a new one."""
        if flat.dtype != torch.float32 or flat.numel() < self.rows * self.cols:
            raise ValueError(f"workspace buffer {name!r}: needs {self.rows * self.cols} fp32")
        self._buffers[name] = flat.view(-1)


def chunk_view(flat: torch.Tensor, rows: int, cols: int, vocab_major: bool) -> torch.Tensor:
    """The first rows x cols elements of a flat buffer as a [rows, cols] tensor: row-major, or
    the transposed view of a [cols, rows] block (vocab-major)."""
    block = flat.view(-1)[: rows * cols]
    return block.view(cols, rows).t() if vocab_major else block.view(rows, cols)


def exp_rowdot(exp_Cv: torch.Tensor, shifted_Cv: torch.Tensor, scratch=None) -> torch.Tensor:
    """sum_j e_j * x_j for e = exp(x): a -inf logit (e = 0) contributes 0, not 0 * -inf = NaN.

    The batched dot runs first; only rows it turned into NaN are redone with the masked
    product (checkpoints with masked columns carry -inf logits; most rows have none).
    """
    value = rowdot(exp_Cv, shifted_Cv, scratch)
    bad = torch.isnan(value)
    if bad.any():
        rows = bad.nonzero()[:, 0]
        e, x = exp_Cv[rows], shifted_Cv[rows]
        value[rows] = torch.where(e > 0, e * x, torch.zeros_like(e)).sum(-1)
    return value


def rowdot(x_Cv: torch.Tensor, y_Cv: torch.Tensor, scratch=None) -> torch.Tensor:
    """sum_j x[c, j] * y[c, j] per row.

    Row-major operands: a batched matrix product (no [C, v] temporary); the second operand is
    passed as a transposed [C, 1, v] view: on CPU that layout is ~2x faster than a [C, v, 1]
    one. Vocab-major operands (Workspace): the product into ``scratch`` (a [C, v] buffer of
    the same layout, or a temporary) and a sum over v - bmm would copy both operands first
    (C=256, v=32,000: 114 ms against 5.6 ms).
    """
    if x_Cv.shape[-1] > 1 and (x_Cv.stride(-1) != 1 or y_Cv.stride(-1) != 1):
        return torch.mul(x_Cv, y_Cv, out=scratch).sum(-1)
    return torch.bmm(x_Cv.unsqueeze(1), y_Cv.unsqueeze(1).transpose(1, 2)).view(-1)


def as_fp32_scaled(x_Cv: torch.Tensor, inv_tau: float, out: torch.Tensor | None = None):
    """fp32 ``x / tau``: the input itself for fp32 at tau = 1, else written to ``out``."""
    if x_Cv.dtype == torch.float32 and inv_tau == 1.0:
        return x_Cv
    if out is None:
        out = torch.empty(x_Cv.shape, device=x_Cv.device)
    if inv_tau != 1.0:
        return torch.mul(x_Cv, inv_tau, out=out)
    return out.copy_(x_Cv)


_ROWDOT_STATS = {"d_s", "q_ss", "b_t", "c_ts", "e_st", "q_tt", "x_st", "sq"}  # rowdot's


def chunk_local_stats(
    student_Cv: torch.Tensor,
    teacher_Cv: torch.Tensor | None,
    sparse: dict | None,
    labels_local_C: torch.Tensor | None,
    spec: LossSpec,
    names: list,
    shard_start: int,
    ws: Workspace | None = None,
) -> torch.Tensor:
    """Local statistics [C, 2 + len(names)] of one chunk: (m_s, m_t, *names).

    ``student_Cv``/``teacher_Cv`` hold only this shard's valid (true-vocab) columns, raw logits
    in any float dtype. ``sparse`` has this chunk's kept entries owned by this shard:
    ``local`` column index [C, K] (clamped), ``owned`` [C, K] bool, ``T`` teacher probs [C, K].
    ``labels_local_C`` are labels minus the shard start (out of range: not owned here).
    Each [C, v] pass is one elementwise op or a batched dot product; about four [C, v] fp32
    buffers are alive at once.
    """
    num, width = student_Cv.shape
    device = student_Cv.device
    tau_s = spec.tau_student if (teacher_Cv is not None or sparse is not None) else 1.0
    out = {}
    if width == 0:
        zeros = torch.zeros(num, device=device)
        out = {name: zeros for name in names}
        if "amax_s" in names:
            out["amax_s"] = torch.full((num,), -1.0, device=device)
        m = torch.full((num,), NEG, device=device)
        return torch.stack([m, m] + [out[n] for n in names], dim=-1)
    ws = ws or Workspace(num, width, device)
    ws.fresh = {}
    # vocab-major rows: the row dot products go through a buffer (rowdot), if there are any
    dot = ws.get("dot", num) if ws.vocab_major and _ROWDOT_STATS.intersection(names) else None
    s = as_fp32_scaled(student_Cv, 1.0 / tau_s, ws.get("s", num))
    if s is not student_Cv:
        ws.fresh["s"] = None
    # max-with-indices is ~10x slower than amax on CPU; a row of -inf logits has maximum NEG
    m_s = s.amax(dim=-1).clamp_min_(NEG)
    if "amax_s" in names:
        amax = s.argmax(dim=-1)
        out["amax_s"] = (amax + shard_start).float()
    shifted_s = torch.sub(s, m_s[:, None], out=ws.get("shifted_s", num))
    exp_s = torch.exp(shifted_s, out=ws.get("exp_s", num))
    out["z_s"] = exp_s.sum(-1)
    ws.fresh["exp_s"] = m_s
    if "d_s" in names:
        out["d_s"] = exp_rowdot(exp_s, shifted_s, dot)
    if "q_ss" in names:
        out["q_ss"] = rowdot(exp_s, exp_s, dot)
    if labels_local_C is not None:
        owned = (labels_local_C >= 0) & (labels_local_C < width)
        picked = student_Cv.gather(1, labels_local_C.clamp(0, width - 1)[:, None])[:, 0].float()
        out["target"] = torch.where(owned, picked, torch.zeros_like(picked))
        if "z_1" in names:  # the hard-label softmax at tau = 1: its max is tau_s * m_s
            raw = as_fp32_scaled(student_Cv, 1.0, ws.get("t", num))
            scratch = torch.sub(raw, (m_s * tau_s)[:, None], out=ws.get("exp_t", num))
            out["z_1"] = scratch.exp_().sum(-1)
    m_t = torch.full_like(m_s, NEG)
    if teacher_Cv is not None:
        t = as_fp32_scaled(teacher_Cv, 1.0 / spec.tau, ws.get("t", num))
        if t is not teacher_Cv:
            ws.fresh["t"] = None
        m_t = t.amax(dim=-1).clamp_min_(NEG)
        shifted_t = torch.sub(t, m_t[:, None], out=ws.get("shifted_t", num))
        exp_t = torch.exp(shifted_t, out=ws.get("exp_t", num))
        out["z_t"] = exp_t.sum(-1)
        ws.fresh["exp_t"] = m_t
        if "b_t" in names:
            out["b_t"] = exp_rowdot(exp_t, shifted_t, dot)
        if "t_at_amax" in names:
            out["t_at_amax"] = shifted_t.gather(1, amax[:, None])[:, 0] + m_t
        if "c_ts" in names:
            out["c_ts"] = rowdot(exp_t, shifted_s, dot)
        if "e_st" in names:
            out["e_st"] = rowdot(exp_s, shifted_t, dot)
        if "q_tt" in names:
            out["q_tt"] = rowdot(exp_t, exp_t, dot)
        if "x_st" in names:
            out["x_st"] = rowdot(exp_s, exp_t, dot)
        if "sq" in names:
            diff = torch.sub(s, t, out=ws.get("diff", num))
            out["sq"] = rowdot(diff, diff, dot)
    if sparse is not None:
        out.update(sparse_kept_stats(shifted_s.gather(1, sparse["local"]), sparse, names))
        if "z_out" in names:  # last use of exp_s: the kept columns are zeroed in place
            out["z_out"] = outside_exp_sum(exp_s, sparse)
            del ws.fresh["exp_s"]
    return torch.stack([m_s, m_t] + [out[n] for n in names], dim=-1)


def outside_exp_sum(exp_Cv: torch.Tensor, sparse: dict) -> torch.Tensor:
    """sum_j exp(s_j - m) over this shard's columns that are *not* kept, summed directly.

    ``exp_Cv`` is overwritten (kept columns set to 0). Computing the outside mass as
    1 - P_K instead cancels catastrophically in fp32 once the student puts more than
    1 - 1e-7 of its mass on the kept set, and the tail's -r log G and its gradient
    -r / G then blow up. The zeroing multiplies by 0/1 factors, so an empty slot (its
    column clamped onto some real column) never undoes a kept one.
    """
    factor = sparse["owned"].logical_not().to(exp_Cv.dtype)
    exp_Cv.scatter_reduce_(1, sparse["local"], factor, reduce="prod")
    return exp_Cv.sum(-1)


def sparse_kept_stats(kept_shifted: torch.Tensor, sparse: dict, names: list) -> dict:
    """The k_* sums over this shard's kept entries [C, K], given the student logits at those
    entries divided by tau_s and shifted by the local maximum."""
    owned, T = sparse["owned"], sparse["T"]
    kept_exp = torch.where(owned, kept_shifted.exp(), torch.zeros_like(kept_shifted))
    out = {"k_z": kept_exp.sum(-1)}
    if "k_sbest" in names:  # relative to the local maximum; -inf where another rank owns it
        best = sparse["best"]
        out["k_sbest"] = torch.where(
            owned.gather(1, best),
            kept_shifted.gather(1, best),
            torch.full_like(best, float("-inf"), dtype=kept_shifted.dtype),
        )[:, 0]
    if "k_qs" in names:
        out["k_qs"] = torch.where(owned, T * kept_shifted, torch.zeros_like(T)).sum(-1)
        out["k_t"] = torch.where(owned, T, torch.zeros_like(T)).sum(-1)
    if "k_zs" in names:
        out["k_zs"] = (kept_exp * kept_shifted).sum(-1)
        # log T from the log-domain teacher (exact where T itself would underflow in fp32)
        log_T = torch.where(owned, sparse["log_T"], torch.zeros_like(T))
        out["k_zlogT"] = (kept_exp * log_T).sum(-1)
    if "k_zz" in names:
        out["k_zz"] = (kept_exp * kept_exp).sum(-1)
        out["k_zt"] = (kept_exp * T).sum(-1)
    return out


# ---------------------------------------------------------------------------- merge
def merge_stats(gathered_RNc: torch.Tensor, names: list, tau_s: float) -> dict:
    """Combine every rank's local statistics [R, N, 2 + c] into global per-token values."""
    m_s_r, m_t_r = gathered_RNc[..., 0], gathered_RNc[..., 1]
    m_s, m_t = m_s_r.max(0).values, m_t_r.max(0).values
    d_s, d_t = m_s_r - m_s, m_t_r - m_t
    factors = {
        "exp_s": d_s.exp(),
        "exp_t": d_t.exp(),
        "exp_2s": (2 * d_s).exp(),
        "exp_2t": (2 * d_t).exp(),
        "exp_st": (d_s + d_t).exp(),
        "exp_1": (tau_s * d_s).exp(),
    }
    local = {n: gathered_RNc[..., 2 + i] for i, n in enumerate(names)}
    merged = {"m_s": m_s, "m_t": m_t}
    for name in names:
        rule, x = RULES[name], local[name]
        if rule == "plain":
            merged[name] = x.sum(0)
        elif rule == "argmax":
            continue
        elif rule == "max_abs_s":  # back to absolute values, then the owner's
            merged[name] = (x + m_s_r).max(0).values
        elif isinstance(rule, str):
            merged[name] = (factors[rule] * x).sum(0)
        else:
            form, base_name = rule
            base = local[base_name]
            if form == "lin_s":
                merged[name] = (x + d_s * base).sum(0)
            elif form == "xlin_s":
                merged[name] = (factors["exp_s"] * (x + d_s * base)).sum(0)
            elif form == "xlin_t":
                merged[name] = (factors["exp_t"] * (x + d_t * base)).sum(0)
            elif form == "xlin_st":
                merged[name] = (factors["exp_s"] * (x + d_t * base)).sum(0)
            elif form == "xlin_ts":
                merged[name] = (factors["exp_t"] * (x + d_s * base)).sum(0)
    if "amax_s" in names:
        # The student's global argmax sits on the rank with the largest local maximum.
        owner = m_s_r.argmax(0, keepdim=True)
        merged["amax_s"] = local["amax_s"].gather(0, owner)[0]
        if "t_at_amax" in names:
            merged["t_at_amax"] = local["t_at_amax"].gather(0, owner)[0]
    return merged


# ---------------------------------------------------------------------------- losses
def _log(x):
    return torch.log(x.clamp_min(1e-38))


def finalize(
    merged: dict,
    spec: LossSpec,
    teacher_kind: str | None,
    sparse_info: dict | None,
    true_vocab: int,
) -> dict:
    """Per-token values from merged statistics.

    Returns {"lm", "kd", "lse_s", "lse_t", "lse_1", "W", "a", ...}: the losses (kd already
    scaled by tau^2 when asked), and the scalars the gradient needs: the student/teacher
    log-normalisers, W (the P-weighted mean of the per-category derivative) and, for a sparse
    teacher, ``a`` (that derivative outside the kept set).
    """
    tau_s = spec.tau_student if teacher_kind else 1.0
    m_s, z_s = merged["m_s"], merged["z_s"]
    lse_s = m_s + _log(z_s)
    values = {"lse_s": lse_s}
    if "target" in merged:
        # The hard-label softmax is at tau = 1; its maximum is tau_s * m_s.
        lse_1 = tau_s * m_s + _log(merged["z_1"]) if "z_1" in merged else lse_s
        values["lse_1"] = lse_1
        values["lm"] = lse_1 - merged["target"]
    if teacher_kind == "dense":
        _finalize_dense(merged, spec, values, true_vocab)
    elif teacher_kind == "sparse":
        _finalize_sparse(merged, spec, values, sparse_info)
    if "kd" in values:
        values["kd"] = values["kd"] * spec.kd_scale
    return values


def _finalize_dense(merged, spec, values, true_vocab):
    m_s, m_t, z_s, z_t = merged["m_s"], merged["m_t"], merged["z_s"], merged["z_t"]
    lse_s, lse_t = values["lse_s"], m_t + _log(z_t)
    values["lse_t"] = lse_t
    if "b_t" in merged:
        mean_t_t = m_t + merged["b_t"] / z_t  # E_T[t~]
        values["teacher_entropy"] = lse_t - mean_t_t
    if "t_at_amax" in merged:
        values["agree"] = (merged["t_at_amax"] >= m_t).float()
    kind = spec.kind
    if kind in ("soft_ce", "forward_kl"):
        mean_t_s = m_s + merged["c_ts"] / z_t  # E_T[s~]
        values["kd"] = lse_s - mean_t_s
        if kind == "forward_kl":
            values["kd"] = values["kd"] + (mean_t_t - lse_t)
    elif kind == "reverse_kl":
        mean_s_s = m_s + merged["d_s"] / z_s
        mean_s_t = m_t + merged["e_st"] / z_s
        values["kd"] = (mean_s_s - lse_s) - (mean_s_t - lse_t)
        values["W"] = values["kd"]
    elif kind == "mse_probs":
        sum_pp = merged["q_ss"] / z_s**2
        sum_tt = merged["q_tt"] / z_t**2
        sum_pt = merged["x_st"] / (z_s * z_t)
        values["kd"] = sum_pp - 2 * sum_pt + sum_tt
        values["W"] = 2 * (sum_pp - sum_pt)
    elif kind == "mse_logits":
        values["kd"] = merged["sq"] / true_vocab


def _finalize_sparse(merged, spec, values, info):
    z_s = merged["z_s"]
    log_z = _log(z_s)
    P_K = (merged["k_z"] / z_s).clamp(0.0, 1.0)
    if "z_out" in merged:  # the student's mass outside the kept set
        G = (merged["z_out"] / z_s).clamp(0.0, 1.0)
    else:  # no tail: G only enters additively (JSD), 1 - P_K is accurate enough
        G = (1.0 - P_K).clamp_min(0.0)
    r, log_r = info["r"], info["log_r"]
    r_log_r = torch.where(r > 0, r * log_r, torch.zeros_like(r))  # xlogy(r, r), log r exact
    values["kept_mass_student"] = P_K
    values["teacher_entropy"] = info["teacher_entropy"]
    if "k_sbest" in merged:  # the teacher's top entry is (one of) the student's maxima
        values["agree"] = (merged["k_sbest"] >= merged["m_s"]).float()
    kind, tail = spec.kind, spec.tail
    if kind in ("soft_ce", "forward_kl"):
        cross = -(merged["k_qs"] - log_z * merged["k_t"])  # -sum_K T_i log P_i
        kd = cross
        if kind == "forward_kl":
            kd = kd + info["sum_TlogT"]
        if tail:
            kd = kd - r * _log(G)
            if kind == "forward_kl":
                kd = kd + r_log_r
        values["kd"] = kd
        values["W"] = torch.full_like(kd, -1.0)
        # the outside derivative a = -r / G; where the outside is empty (G = 0) it multiplies
        # only P_j = 0 and is set to 0 so that no inf * 0 arises
        values["a"] = (
            torch.where(G > 0, -r / G.clamp_min(1e-38), 0.0) if tail else torch.zeros_like(kd)
        )
    elif kind == "reverse_kl":  # tail required
        sum_PlogP = merged["k_zs"] / z_s - log_z * P_K
        sum_PlogT = merged["k_zlogT"] / z_s
        # G log G - G log r with log r carried exactly (r = 1e-22 is not clamped to 1e-38)
        kd = sum_PlogP - sum_PlogT + torch.xlogy(G, G) - torch.where(G > 0, G * log_r, 0.0)
        values["kd"] = kd
        values["W"] = kd
        values["a"] = torch.where(G > 0, _log(G) - log_r, 0.0)  # G = 0: nothing outside
    elif kind == "mse_probs":
        sum_pp = merged["q_ss"] / z_s**2
        kept_pp = merged["k_zz"] / z_s**2
        kept_pt = merged["k_zt"] / z_s
        kept = kept_pp - 2 * kept_pt + info["sum_TT"]
        if tail:
            values["kd"] = kept + (G - r) ** 2
            values["W"] = 2 * (kept_pp - kept_pt) + 2 * G * (G - r)
            values["a"] = 2 * (G - r)
        else:
            values["kd"] = kept + (sum_pp - kept_pp)
            values["W"] = 2 * (kept_pp - kept_pt) + 2 * (sum_pp - kept_pp)
            values["a"] = None  # outside the kept set the derivative is 2 P_j itself
    values["G"] = G


def jsd_outside_terms(spec: LossSpec, G, r) -> tuple:
    """JSD value and P-weighted derivative mass from outside a sparse teacher's kept set."""
    beta = spec.jsd_beta
    if spec.tail:
        mix = beta * r + (1 - beta) * G
        value = beta * (torch.xlogy(r, r) - torch.xlogy(r, mix)) + (1 - beta) * (
            torch.xlogy(G, G) - torch.xlogy(G, mix)
        )
        w = (1 - beta) * (_log(G) - _log(mix))
        return value, G * w, w
    w = torch.full_like(G, -(1 - beta) * math.log(1 - beta))
    return G * w, G * w, w


def jsd_terms(P, T, beta: float) -> tuple:
    """Elementwise JSD value and P * derivative (before summing), P and T probabilities."""
    mix = beta * T + (1 - beta) * P
    log_mix = _log(mix)
    value = beta * (torch.xlogy(T, T) - T * log_mix) + (1 - beta) * (
        torch.xlogy(P, P) - P * log_mix
    )
    weighted = (1 - beta) * (torch.xlogy(P, P) - P * log_mix)
    return value, weighted
