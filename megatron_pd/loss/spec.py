"""What a distillation loss computes (LossSpec) and how the teacher is given (dense or sparse).

Definitions, per token, over the true vocabulary V (padded columns never count). Student
logits s, teacher logits t, temperature tau; the student is divided by tau too unless
``tau_on_student`` is False:

    s~ = s / tau_s,  t~ = t / tau,   P = softmax(s~),  T = softmax(t~)

    soft_ce      -sum_j T_j log P_j                       (the paper's "NLL")
    forward_kl    sum_j T_j log(T_j / P_j)                (the paper's "KLD"; same gradient)
    reverse_kl    sum_j P_j log(P_j / T_j)
    jsd           beta * KL(T || M) + (1 - beta) * KL(P || M),  M = beta*T + (1-beta)*P
    mse_probs     sum_j (P_j - T_j)^2                     (on probabilities)
    mse_logits    (1/V) sum_j (s~_j - t~_j)^2             (on raw logits; dense teacher only)

    loss = (1 - alpha) * CE(s, label) + alpha * c * KD,   c = tau^2 if tau_squared else 1

The hard-label CE always uses tau = 1. A *sparse* teacher gives, per token, the kept entries
of a top-p-k truncation: global token ids and log-probabilities at tau = 1 under the full
teacher distribution, and (optionally) log r, the log of the teacher mass outside the kept
entries. The kept log-probs divided by tau are renormalised over the kept set (q); without a
tail the teacher puts probability 0 elsewhere (the paper's choice). With ``tail=True`` the
dropped mass r becomes one extra "ghost" category on both sides: teacher r, student the mass
it puts outside the kept set, and the kept teacher entries are scaled to (1 - r) * q.
reverse_kl with a sparse teacher needs the tail (without it the teacher has zeros where the
student does not). r is taken from ``log_tail`` when the teacher carries it (truncation, the
exchange and the store do: exact down to r = 1e-38 and beyond), else derived from the kept
log-probs as -expm1(logsumexp(kept)) in float64 (exact only as far as those log-probs are).

Tokens whose label is ``ignore_index`` contribute 0 and get zero gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KD_KINDS = ("soft_ce", "forward_kl", "reverse_kl", "jsd", "mse_probs", "mse_logits")
IMPLEMENTATIONS = ("reference", "torch", "triton", "compiled")


@dataclass(frozen=True)
class LossSpec:
    """A distillation objective; see the module docstring for the exact formulas."""

    kind: str = "forward_kl"
    alpha: float = 1.0
    tau: float = 1.0
    tau_on_student: bool = True
    tau_squared: bool = False
    jsd_beta: float = 0.5
    tail: bool = False
    ignore_index: int = -100

    def __post_init__(self):
        if self.kind not in KD_KINDS:
            raise ValueError(f"loss kind {self.kind!r}: must be one of {', '.join(KD_KINDS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha}: must be in [0, 1]")
        if not 0.0 < self.tau < math.inf:
            raise ValueError(f"tau={self.tau}: must be finite and > 0")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta={self.jsd_beta}: must be in (0, 1)")

    @property
    def tau_student(self) -> float:
        return self.tau if self.tau_on_student else 1.0

    @property
    def kd_scale(self) -> float:
        return self.tau**2 if self.tau_squared else 1.0

    def check_teacher(self, teacher) -> None:
        """Raise ValueError for a loss/teacher combination that is undefined."""
        if isinstance(teacher, SparseTeacher):
            if self.kind == "mse_logits":
                raise ValueError("mse_logits needs a dense teacher (a sparse one keeps no logits)")
            if self.kind == "reverse_kl" and not self.tail:
                raise ValueError(
                    "reverse_kl with a sparse teacher needs tail=True (the truncated teacher "
                    "is 0 where the student is not)"
                )
        elif teacher is None and self.alpha > 0.0:
            raise ValueError(f"alpha={self.alpha} needs a teacher")


@dataclass
class DenseTeacher:
    """Teacher logits in the student's vocab layout: [N, v] on each rank (padding ignored)."""

    logits: torch.Tensor


@dataclass
class SparseTeacher:
    """Kept teacher entries per token: global ids [N, K] (-1 = empty slot), their
    log-probabilities at tau = 1 under the full teacher distribution [N, K], and optionally
    ``log_tail`` [N]: log of the teacher mass outside the kept entries (-inf: nothing was
    dropped; None: unknown, derived from the kept log-probs where needed)."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor | None = None

    def __post_init__(self):
        if self.indices.shape != self.logprobs.shape or self.indices.dim() != 2:
            raise ValueError(
                f"sparse teacher: indices {tuple(self.indices.shape)} and logprobs "
                f"{tuple(self.logprobs.shape)} must both be [tokens, K]"
            )
        if self.log_tail is not None and tuple(self.log_tail.shape) != (self.indices.shape[0],):
            raise ValueError(
                f"sparse teacher: log_tail {tuple(self.log_tail.shape)} must be "
                f"[tokens] = ({self.indices.shape[0]},)"
            )

    @property
    def valid(self) -> torch.Tensor:
        return self.indices >= 0

    def kept_counts(self) -> torch.Tensor:
        """Number of kept entries per token [N]."""
        return self.valid.sum(dim=-1)


def tail_log_mass(teacher: SparseTeacher) -> torch.Tensor:
    """log r [N] (float64): the carried ``log_tail``, or -expm1(logsumexp(kept)) computed in
    float64 from the kept log-probs (r = 0, log r = -inf, where they hold all the mass)."""
    if teacher.log_tail is not None:
        return teacher.log_tail.double()
    logp = torch.where(
        teacher.valid,
        teacher.logprobs.double(),
        torch.full_like(teacher.logprobs.double(), -math.inf),
    )
    log_kept = torch.logsumexp(logp, dim=-1).clamp_max(0.0)  # a kept mass above 1 is rounding
    # log(1 - e^x) = log(-expm1(x)): exact for x near 0, where 1 - kept mass would cancel
    return torch.log(-torch.expm1(log_kept))


def sparse_teacher_distribution(
    teacher: SparseTeacher, tau: float, tail: bool, dtype: torch.dtype = torch.float32
) -> tuple:
    """(T [N, K], r [N], log r [N]): kept-entry teacher probabilities, the tail mass, its log.

    T = (1 - r) * softmax(logprob / tau) over the kept entries when ``tail``, else the plain
    renormalised softmax (r is still returned for logging). Empty slots get T = 0. r and
    log r come from ``tail_log_mass`` (r in ``dtype`` may underflow to 0; log r stays exact).
    """
    valid = teacher.valid
    logp = teacher.logprobs.to(dtype)
    scaled = torch.where(valid, logp / tau, torch.full_like(logp, float("-inf")))
    any_valid = valid.any(dim=-1, keepdim=True)
    q = torch.softmax(torch.where(any_valid, scaled, torch.zeros_like(scaled)), dim=-1)
    q = torch.where(valid, q, torch.zeros_like(q))
    log_r = tail_log_mass(teacher)
    r = log_r.exp().to(dtype)
    if tail:
        q = q * (-torch.expm1(log_r)).to(dtype)[:, None]  # 1 - r without cancellation
    return q, r, log_r.to(dtype)


def check_inputs(
    student_Nv, labels_N, teacher, spec: LossSpec, vocab, values: bool, tp_group=None
) -> None:
    """ValueError naming the tensor and shapes for input the loss would silently misread.

    Shape checks always (no data is read); with ``values`` also the contents: label range,
    sparse ids in [-1, V) and unique per token, log-probs finite and <= 0, the tail mass
    log r <= 0 and consistent with the kept mass (a few reductions over [N] and [N, K]); and
    one pass over the logits: no NaN, no dense teacher row without probability anywhere (one
    MAX all-reduce of [N] over ``tp_group``, which must then be given). ``vocab`` is this
    rank's VocabInfo.
    """
    if teacher is not None and not isinstance(teacher, (DenseTeacher, SparseTeacher)):
        raise ValueError(
            f"teacher is a {type(teacher).__name__}: pass a DenseTeacher, a SparseTeacher or "
            "None (alpha = 0)"
        )
    if student_Nv.dim() != 2 or not student_Nv.is_floating_point():
        raise ValueError(
            f"student logits must be a float [tokens, vocab shard] tensor, got "
            f"{student_Nv.dtype} {tuple(student_Nv.shape)}"
        )
    rows, width = student_Nv.shape
    if width != vocab.shard_size:
        raise ValueError(
            f"student logits have {width} columns, this rank's vocab shard has "
            f"{vocab.shard_size} (padded vocabulary {vocab.padded_size} / tp {vocab.tp_size})"
        )
    if labels_N is None:
        if spec.alpha < 1.0:
            raise ValueError(
                f"labels=None with alpha={spec.alpha}: the hard-label term (1 - alpha) * CE "
                "needs labels (pass alpha=1 for KD only)"
            )
    elif tuple(labels_N.shape) != (rows,) or labels_N.is_floating_point():
        raise ValueError(
            f"labels have shape {tuple(labels_N.shape)} ({labels_N.dtype}): need integer "
            f"[tokens] = ({rows},) like the student logits"
        )
    if isinstance(teacher, DenseTeacher):
        logits = teacher.logits
        if logits.dim() != 2 or logits.shape[0] != rows:
            raise ValueError(
                f"teacher logits have {logits.shape[0] if logits.dim() else 0} rows, the "
                f"student logits {rows} (teacher {tuple(logits.shape)}, student "
                f"{tuple(student_Nv.shape)})"
            )
        if logits.shape[1] != width:
            raise ValueError(
                f"teacher logits have {logits.shape[1]} columns, the student logits {width}: "
                "a dense teacher must be in the student's vocab layout"
            )
    elif isinstance(teacher, SparseTeacher):
        if teacher.indices.shape[0] != rows:
            raise ValueError(
                f"teacher entries have {teacher.indices.shape[0]} rows, the student logits "
                f"{rows} (indices {tuple(teacher.indices.shape)})"
            )
    if values:
        _check_values(labels_N, teacher, spec, vocab)
        _check_logits(student_Nv, teacher, vocab, tp_group)


def _check_logits(student_Nv, teacher, vocab, tp_group) -> None:
    """NaN anywhere, or a dense teacher row that is -inf over the whole true vocabulary.

    Per-row flags of every shard are combined by one MAX all-reduce over ``tp_group``, so all
    ranks raise the same error (a rank raising alone would leave the others in a collective).
    """
    valid = vocab.valid_in_shard
    rows = student_Nv.shape[0]
    if student_Nv.device.type == "meta":  # shapes only (the fused output layer's probe)
        student_nan = torch.zeros(rows, device="cpu")
        device = "cpu"
    else:
        student_nan = torch.isnan(student_Nv[:, :valid]).any(-1).float()
        device = student_Nv.device
    flags = torch.stack([student_nan.to(device), torch.zeros(rows, device=device)], -1)
    best = torch.full((rows,), math.inf, device=device)
    if isinstance(teacher, DenseTeacher):
        logits = teacher.logits[:, :valid]
        flags[:, 1] = torch.isnan(logits).any(-1).float()
        best = logits.float().amax(-1) if valid else torch.full((rows,), -math.inf, device=device)
    combined = torch.cat([flags, best[:, None].float()], -1).contiguous()
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        torch.distributed.all_reduce(combined, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    for column, what in ((0, "student"), (1, "teacher")):
        if combined[:, column].any():
            row = int(combined[:, column].nonzero()[0, 0])
            raise ValueError(f"{what} logits are NaN at token {row}")
    if torch.isneginf(combined[:, 2]).any():
        row = int(torch.isneginf(combined[:, 2]).nonzero()[0, 0])
        raise ValueError(
            f"teacher logits are -inf at every column of token {row}: the teacher gives it no "
            "probability anywhere"
        )


def _check_values(labels_N, teacher, spec: LossSpec, vocab) -> None:
    true_vocab = vocab.true_size
    if labels_N is not None and labels_N.numel():
        bad = (labels_N != spec.ignore_index) & ((labels_N < 0) | (labels_N >= true_vocab))
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels must be ignore_index ({spec.ignore_index}) or in [0, {true_vocab}): "
                f"found {int(labels_N[row])} at token {row}"
            )
    if not isinstance(teacher, SparseTeacher) or not teacher.indices.numel():
        return
    ids = teacher.indices
    bad = (ids < -1) | (ids >= true_vocab)
    if bad.any():
        row, slot = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"teacher ids must be -1 (empty) or in [0, {true_vocab}): found "
            f"{int(ids[row, slot])} at token {row}, slot {slot}"
        )
    ordered = ids.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        row, slot = (int(i) for i in repeated.nonzero()[0])
        raise ValueError(
            f"teacher ids repeat within a token (row {row}: id {int(ordered[row, slot])}); "
            "each kept id must appear once"
        )
    logp = teacher.logprobs
    bad = teacher.valid & ~(torch.isfinite(logp) & (logp <= LOGPROB_SLACK))
    if bad.any():
        row, slot = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"teacher log-probs must be finite and <= 0 (log-probabilities at tau = 1): found "
            f"{float(logp[row, slot])} at token {row}, slot {slot}"
        )
    if teacher.log_tail is None:
        return
    log_tail = teacher.log_tail
    if tuple(log_tail.shape) != (ids.shape[0],):
        raise ValueError(
            f"teacher log_tail has shape {tuple(log_tail.shape)}, need [tokens] = ({ids.shape[0]},)"
        )
    bad = torch.isnan(log_tail) | (log_tail > LOGPROB_SLACK)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"teacher log_tail (log of the dropped mass r) must be <= 0: found "
            f"{float(log_tail[row])} at token {row}"
        )
    # the kept entries are log-probs under the full distribution: kept mass + r = 1
    kept = torch.where(teacher.valid, logp.double(), torch.full_like(logp, -math.inf).double())
    total = torch.logaddexp(torch.logsumexp(kept, -1), log_tail.double())
    bad = teacher.valid.any(-1) & ~(total.abs() <= TAIL_SLACK)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"teacher log_tail {float(log_tail[row])} and the kept log-probs of token {row} "
            f"do not add up to probability 1 (log of the sum: {float(total[row]):.4f})"
        )


# A stored log-prob may round a little above 0 (quantization, fp16): not a user error.
LOGPROB_SLACK = 1e-3
# kept mass + tail mass = 1 up to the store's 8-bit log-prob codes (half a step, 0.03 nats,
# on each entry) and fp16 log r: 0.1 nats is far outside that and far inside a real mistake.
TAIL_SLACK = 0.1
