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
teacher distribution. The kept log-probs divided by tau are renormalised over the kept set
(q); without a tail the teacher puts probability 0 elsewhere (the paper's choice). With
``tail=True`` the dropped mass r = 1 - sum(kept probabilities at tau=1) becomes one extra
"ghost" category on both sides: teacher r, student the mass it puts outside the kept set, and
the kept teacher entries are scaled to (1 - r) * q. reverse_kl with a sparse teacher needs the
tail (without it the teacher has zeros where the student does not).

Tokens whose label is ``ignore_index`` contribute 0 and get zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KD_KINDS = ("soft_ce", "forward_kl", "reverse_kl", "jsd", "mse_probs", "mse_logits")
IMPLEMENTATIONS = ("reference", "torch", "triton")


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
        if not self.tau > 0.0:
            raise ValueError(f"tau={self.tau}: must be > 0")
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
    """Kept teacher entries per token: global ids [N, K] (-1 = empty slot) and their
    log-probabilities at tau = 1 under the full teacher distribution [N, K]."""

    indices: torch.Tensor
    logprobs: torch.Tensor

    def __post_init__(self):
        if self.indices.shape != self.logprobs.shape or self.indices.dim() != 2:
            raise ValueError(
                f"sparse teacher: indices {tuple(self.indices.shape)} and logprobs "
                f"{tuple(self.logprobs.shape)} must both be [tokens, K]"
            )

    @property
    def valid(self) -> torch.Tensor:
        return self.indices >= 0

    def kept_counts(self) -> torch.Tensor:
        """Number of kept entries per token [N]."""
        return self.valid.sum(dim=-1)


def sparse_teacher_distribution(
    teacher: SparseTeacher, tau: float, tail: bool, dtype: torch.dtype = torch.float32
) -> tuple:
    """(T [N, K], r [N]): teacher probabilities of the kept entries and the tail mass.

    T = (1 - r) * softmax(logprob / tau) over the kept entries when ``tail``, else the plain
    renormalised softmax (r is still returned for logging). Empty slots get T = 0.
    """
    valid = teacher.valid
    logp = teacher.logprobs.to(dtype)
    scaled = torch.where(valid, logp / tau, torch.full_like(logp, float("-inf")))
    any_valid = valid.any(dim=-1, keepdim=True)
    q = torch.softmax(torch.where(any_valid, scaled, torch.zeros_like(scaled)), dim=-1)
    q = torch.where(valid, q, torch.zeros_like(q))
    kept_mass = torch.where(valid, logp.exp(), torch.zeros_like(logp)).sum(dim=-1)
    r = (1.0 - kept_mass).clamp_min(0.0)
    if tail:
        q = q * (1.0 - r)[:, None]
    return q, r
