"""Benchmark megatron_pd's output layer + distillation loss against its peers on one input set.

    python tools/bench_peers.py                          # N=1024, H=1024, V=32000, ~7 min
    python tools/bench_peers.py --tokens 2048 --hidden 2048 --vocab 151552 --json runs/peers.json

Every row is the forward + backward of the output layer (student logits h W^T, made apart
or inside the loss) and the objective  sum over non-ignored tokens of
(1 - alpha) * CE(label) + alpha * KL(teacher || student),  with gradients for h and W:

  eager            torch: h W^T, log_softmax + kl_div(log_target=True) + cross_entropy
  mpd logits       megatron_pd: h W^T, then loss.objective.distillation_loss (impl torch)
  mpd fused        megatron_pd: loss.fused_linear.fused_linear_distillation_loss (impl
                   torch); teacher as logits (DenseTeacher) or hidden + weight (HiddenTeacher)
  mpd fused        the same with impl compiled: its row kernels compiled by inductor (as
    compiled       Liger's compiled row is)
  liger            Liger-Kernel LigerFusedLinearJSDLoss with beta = 0 (its forward KL); the
                   teacher is hidden + weight (it fuses the teacher's GEMM too)
  modelopt         NVIDIA ModelOpt's Megatron LogitsKLLoss (KD only, alpha = 1), and the same
                   plus megatron-core's vocab_parallel_cross_entropy, weighted here

Per row: TP, median fwd+bwd time of --repeats after one warm-up, peak extra memory (VmHWM
reset before the first timed fwd+bwd minus RSS before; per rank, the max shown), collectives
per micro-batch (c10d ops seen by a dispatch mode during one fwd+bwd), and agreement with the
megatron_pd logits path at TP=1 and the same alpha: |loss per token - reference| and the max
abs difference of dL/dh and dL/dW (a rank's rows of W against the same rows of the
reference). After the table, every peer row (eager torch included) side by side with each
megatron_pd row given the same inputs (TP, alpha, teacher as logits or hidden): time and
memory ratios ours / peer. Each row runs in fresh processes: TP=1 one process with 2
threads, TP=2 two gloo ranks with 1 thread each (2 cores in all either way).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.metadata
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE_INDEX = -100
PEERS = {
    "torch": "torch",
    "megatron-core": "megatron-core",
    "modelopt": "nvidia-modelopt",
    "liger": "liger-kernel",
}
# the arguments every worker gets from the parent, so all rows see the same inputs
SHARED_ARGS = (
    "tokens",
    "hidden",
    "teacher_hidden",
    "vocab",
    "tau",
    "seed",
    "repeats",
    "ignore_frac",
    "logit_scale",
    "liger_chunk",
)


@dataclass(frozen=True)
class Case:
    """One table row: an implementation, its TP size, alpha, and how it is given the teacher."""

    impl: str
    tp: int
    alpha: float
    label: str
    teacher: str  # "logits" (dense [N, v]) or "hidden" (hidden [N, H_t] + weight [v, H_t])

    @property
    def key(self) -> str:
        return f"{self.impl}-tp{self.tp}-a{self.alpha}"

    @property
    def is_reference(self) -> bool:
        return self.impl == "mpd_logits" and self.tp == 1


def threads_for(tp: int) -> int:
    """2 cores in all: two threads for one process, one each for two ranks."""
    return 2 if tp == 1 else 1


def build_cases(args) -> list:
    """The rows, references (mpd logits at TP=1) first: later rows compare against them."""
    hard = 1.0 - args.alpha
    mix = f"{hard:g} CE + {args.alpha:g} KL"
    compiled = "megatron_pd fused (compiled)"
    specs = [
        ("mpd_logits", (1, 2), args.alpha, f"megatron_pd logits path, {mix}", "logits"),
        ("mpd_logits", (1, 2), 1.0, "megatron_pd logits path, KL only", "logits"),
        ("eager", (1,), args.alpha, f"eager torch, {mix}", "logits"),
        ("mpd_fused", (1, 2), args.alpha, f"megatron_pd fused, {mix}", "logits"),
        ("mpd_fused_hidden", (1, 2), args.alpha, f"megatron_pd fused, {mix}", "hidden"),
        ("mpd_fused_compiled", (1, 2), args.alpha, f"{compiled}, {mix}", "logits"),
        ("mpd_fused_hidden_compiled", (1, 2), args.alpha, f"{compiled}, {mix}", "hidden"),
        ("liger", (1,), args.alpha, f"Liger JSD beta=0 (eager chunks), {mix}", "hidden"),
        ("liger_compiled", (1,), args.alpha, f"Liger JSD beta=0 (compiled), {mix}", "hidden"),
        ("modelopt_ce", (1, 2), args.alpha, f"ModelOpt KL + mcore CE, {mix}", "logits"),
        ("modelopt", (1, 2), 1.0, "ModelOpt LogitsKLLoss, KL only", "logits"),
    ]
    cases = [
        Case(impl, tp, alpha, label, teacher)
        for impl, tps, alpha, label, teacher in specs
        for tp in tps
        if tp in args.tp and (not args.rows or impl in args.rows)
    ]
    for tp in {case.tp for case in cases}:
        if args.vocab % tp:
            raise ValueError(f"--vocab {args.vocab} must be divisible by TP={tp}")
    return sorted(cases, key=lambda case: not case.is_reference)


# ------------------------------------------------------------------ inputs
def make_inputs(args) -> dict:
    """Global tensors from a seeded generator (every process builds the same ones)."""
    g = torch.Generator().manual_seed(args.seed)
    N, H, H_t, V = args.tokens, args.hidden, args.teacher_hidden, args.vocab
    labels_N = torch.randint(0, V, (N,), generator=g)
    labels_N[torch.rand(N, generator=g) < args.ignore_frac] = IGNORE_INDEX
    # weights scaled so that logits have standard deviation logit_scale
    return {
        "hidden_NH": torch.randn(N, H, generator=g),
        "weight_VH": torch.randn(V, H, generator=g) * (args.logit_scale / H**0.5),
        "teacher_hidden_NH": torch.randn(N, H_t, generator=g),
        "teacher_weight_VH": torch.randn(V, H_t, generator=g) * (args.logit_scale / H_t**0.5),
        "labels_N": labels_N,
    }


def shard_inputs(inputs: dict, case: Case, rank: int) -> dict:
    """This rank's leaves: h (replicated), its vocab rows of W, and the teacher in the form
    the implementation takes (its vocab columns of the logits, or hidden + weight rows)."""
    width = inputs["weight_VH"].shape[0] // case.tp
    rows = slice(rank * width, (rank + 1) * width)
    x = {
        "hidden_NH": inputs["hidden_NH"].clone().requires_grad_(),
        "weight_vH": inputs["weight_VH"][rows].clone().requires_grad_(),
        "labels_N": inputs["labels_N"].clone(),
        "mask_N": (inputs["labels_N"] != IGNORE_INDEX).float(),
        "rows": (rows.start, rows.stop),
    }
    teacher_weight = inputs["teacher_weight_VH"][rows]
    if case.teacher == "hidden":
        x["teacher_hidden_NH"] = inputs["teacher_hidden_NH"].clone()
        x["teacher_weight_vH"] = teacher_weight.clone()
    else:
        x["teacher_logits_Nv"] = inputs["teacher_hidden_NH"] @ teacher_weight.t()
    return x


# ------------------------------------------------------------------ the implementations
# Each builder does the setup once and returns (step, self_reported): step() runs one
# forward + backward and returns the objective's value summed over tokens (all ranks).


def _spec_and_vocab(x, case, args):
    from megatron_pd.loss.spec import LossSpec
    from megatron_pd.parallel.vocab import VocabInfo

    spec = LossSpec(kind="forward_kl", alpha=case.alpha, tau=args.tau, ignore_index=IGNORE_INDEX)
    rank = x["rows"][0] // x["weight_vH"].shape[0]
    return spec, VocabInfo(args.vocab, args.vocab, case.tp, rank)


def build_eager(x, case, args, group):
    F = torch.nn.functional

    def step():
        logits_NV = x["hidden_NH"] @ x["weight_vH"].t()
        log_student = F.log_softmax(logits_NV / args.tau, -1)
        log_teacher = F.log_softmax(x["teacher_logits_Nv"] / args.tau, -1)
        kd_N = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
        ce_N = F.cross_entropy(logits_NV, x["labels_N"], reduction="none")
        total = (((1 - case.alpha) * ce_N + case.alpha * kd_N) * x["mask_N"]).sum()
        total.backward()
        return total.item()

    return step, None


def build_mpd_logits(x, case, args, group):
    from megatron_pd.loss.objective import distillation_loss
    from megatron_pd.loss.spec import DenseTeacher
    from megatron_pd.parallel.collectives import copy_to_group

    spec, vocab = _spec_and_vocab(x, case, args)
    teacher = DenseTeacher(x["teacher_logits_Nv"])

    def step():
        # copy_to_group: the all-reduce of dL/dh the vocab-parallel output layer needs
        logits_Nv = copy_to_group(x["hidden_NH"], group) @ x["weight_vH"].t()
        out = distillation_loss(
            logits_Nv,
            x["labels_N"],
            teacher,
            spec,
            vocab,
            group,
            impl="torch",
            metrics=False,
            check_inputs=False,
        )
        total = (out["loss"] * x["mask_N"]).sum()
        total.backward()
        return total.item()

    return step, None


def build_mpd_fused(x, case, args, group):
    from megatron_pd.loss.fused_linear import HiddenTeacher, fused_linear_distillation_loss
    from megatron_pd.loss.spec import DenseTeacher

    spec, vocab = _spec_and_vocab(x, case, args)
    if case.teacher == "hidden":
        teacher = HiddenTeacher(x["teacher_hidden_NH"], x["teacher_weight_vH"])
    else:
        teacher = DenseTeacher(x["teacher_logits_Nv"])
    reported = []

    def step():
        reported.clear()
        out = fused_linear_distillation_loss(
            x["hidden_NH"],
            x["weight_vH"],
            x["labels_N"],
            x["mask_N"],
            teacher,
            spec,
            vocab,
            group,
            impl="compiled" if case.impl.endswith("_compiled") else "torch",
            metrics=False,
            check_inputs=False,
            collectives=reported,
        )
        out["weighted"].backward()
        return out["weighted"].item()

    return step, reported


def build_liger(x, case, args, group, compiled: bool = False):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    # beta = 0 is its KL(teacher || student); the hard CE is at tau = 1, no tau^2 factor
    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=1.0 - case.alpha,
        weight_soft_loss=case.alpha,
        beta=0.0,
        ignore_index=IGNORE_INDEX,
        temperature=args.tau,
        compiled=compiled,
        chunk_size=args.liger_chunk,
    )
    num_valid = max(int(x["mask_N"].sum()), 1)

    def step():
        mean = loss_fn(
            x["hidden_NH"],
            x["weight_vH"],
            x["teacher_hidden_NH"],
            x["teacher_weight_vH"],
            x["labels_N"],
        )
        total = mean * num_valid  # it averages over non-ignored tokens: back to a sum
        total.backward()
        return total.item()

    return step, None


def build_modelopt(x, case, args, group, with_ce: bool = False):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
    from megatron.core.transformer import TransformerConfig
    from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

    from megatron_pd.parallel import topology

    topology.init_student_groups(case.tp, 1)  # ModelOpt and mcore read parallel_state's groups
    tp_group = parallel_state.get_tensor_model_parallel_group()
    config = TransformerConfig(
        num_layers=1,
        hidden_size=args.hidden,
        num_attention_heads=case.tp,
        tensor_model_parallel_size=case.tp,
    )
    kd_loss = LogitsKLLoss(config, temperature=args.tau)
    teacher_SBv = x["teacher_logits_Nv"].unsqueeze(1)  # megatron's [seq, batch, vocab shard]
    labels_SB = x["labels_N"].unsqueeze(1)
    alpha, mask_N = case.alpha, x["mask_N"]

    def step():
        hidden_NH = copy_to_tensor_model_parallel_region(x["hidden_NH"])
        logits_SBv = (hidden_NH @ x["weight_vH"].t()).unsqueeze(1)
        kd_BS, tp_reduce, _ = kd_loss(logits_SBv, teacher_SBv)
        # Its consumer (Megatron-LM's post-training loss_func) masks and sums the tokens, then
        # all-reduces that scalar over TP when tp_reduce: each rank's value covers its shard.
        kd_local = (kd_BS.reshape(-1) * mask_N).sum()
        kd_value = kd_local.detach().clone()
        if tp_reduce and case.tp > 1:
            dist.all_reduce(kd_value, group=tp_group)
        objective, value = alpha * kd_local, alpha * kd_value
        if with_ce:
            # after the KL: mcore's CE shifts fp32 logits in place (the KL saved none of them)
            ce_N = vocab_parallel_cross_entropy(logits_SBv, labels_SB).reshape(-1)
            ce_sum = (ce_N * mask_N).sum()
            objective = objective + (1.0 - alpha) * ce_sum
            value = value + (1.0 - alpha) * ce_sum.detach()
        objective.backward()
        return value.item()

    return step, None


BUILDERS = {
    "eager": build_eager,
    "mpd_logits": build_mpd_logits,
    "mpd_fused": build_mpd_fused,
    "mpd_fused_hidden": build_mpd_fused,
    "mpd_fused_compiled": build_mpd_fused,
    "mpd_fused_hidden_compiled": build_mpd_fused,
    "liger": build_liger,
    "liger_compiled": lambda *a: build_liger(*a, compiled=True),
    "modelopt": build_modelopt,
    "modelopt_ce": lambda *a: build_modelopt(*a, with_ce=True),
}


# ------------------------------------------------------------------ one row, in a worker
class CollectiveCounter(TorchDispatchMode):
    """Counts the c10d collectives (forward and backward) issued while it is active."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = str(func).split(".")[:2]
        if namespace == "c10d":
            self.counts[name.strip("_")] += 1
        return func(*args, **(kwargs or {}))


def _clear_grads(x: dict) -> None:
    x["hidden_NH"].grad = None
    x["weight_vH"].grad = None


def _agreement(x: dict, value: float, case: Case, ref_dir: str) -> dict:
    """Save the reference's loss and gradients, or compare with the reference of this alpha."""
    path = os.path.join(ref_dir, f"reference-a{case.alpha}.pt")
    grad_h, grad_w = x["hidden_NH"].grad, x["weight_vH"].grad
    if case.is_reference:
        torch.save({"loss": value, "grad_h": grad_h, "grad_w": grad_w}, path)
        return {"reference": True}
    if not os.path.exists(path):
        return {"reference_missing": True}
    ref = torch.load(path)
    start, stop = x["rows"]
    return {
        "loss_diff": abs(value - ref["loss"]),
        "grad_h_diff": (grad_h - ref["grad_h"]).abs().max().item(),
        "grad_w_diff": (grad_w - ref["grad_w"][start:stop]).abs().max().item(),
    }


def run_row(args, case: Case, rank: int) -> dict:
    """Inside a fresh process: agreement, peak memory, time and collectives of one row."""
    import torch.distributed as dist

    sys.path.insert(0, REPO)
    from megatron_pd.parallel import topology
    from megatron_pd.platform import quiet_known_warnings
    from megatron_pd.platform.peak_memory import PeakMemory

    quiet_known_warnings()
    torch.set_num_threads(threads_for(case.tp))
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(args.port),
        RANK=str(rank),
        WORLD_SIZE=str(case.tp),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group(
        "gloo", rank=rank, world_size=case.tp, timeout=datetime.timedelta(seconds=300)
    )
    topology.init_distributed()  # keeps the group above; activates megatron's CPU adaptation
    group = dist.group.WORLD
    x = shard_inputs(make_inputs(args), case, rank)
    step, reported = BUILDERS[case.impl](x, case, args, group)
    # The warm-up doubles as the agreement run and, under a dispatch mode that only counts
    # c10d ops, as the collective count - except where torch.compile runs: a mode active while
    # it compiles would be guarded on, and the timed calls would recompile.
    compiles = case.impl.endswith("_compiled")
    counter = CollectiveCounter()
    with counter if not compiles else contextlib.nullcontext():
        result = {"loss": step(), "num_valid": int(x["mask_N"].sum())}
    if reported is not None:
        result["self_reported"] = list(reported)
    result.update(_agreement(x, result["loss"], case, args.ref_dir))
    times = []
    for repeat in range(args.repeats):
        _clear_grads(x)
        dist.barrier(group)
        # the first timed call also gives the peak memory (a warm call: no compile in it)
        with PeakMemory() if repeat == 0 else contextlib.nullcontext() as peak:
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        if repeat == 0:
            result["peak_extra_mb"], result["exact_peak"] = peak.extra_mb, peak.exact
    result["time_s"] = statistics.median(times)
    if compiles:
        _clear_grads(x)
        with counter:
            step()
    result["collectives"] = dict(counter.counts)
    topology.destroy()
    return result


# ------------------------------------------------------------------ the parent
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_row(args, case: Case, work_dir: str) -> dict:
    """Run one row in ``case.tp`` fresh processes; merge the ranks' results (max per rank)."""
    port, procs, outs = _free_port(), [], []
    shared = []
    for name in SHARED_ARGS:
        value = getattr(args, name)
        shared += [f"--{name.replace('_', '-')}", str(value)]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads_for(case.tp)),
        # every big buffer goes back to the OS when freed: the peak RSS is the peak of live
        # allocations, not of glibc's arena growth
        MALLOC_MMAP_THRESHOLD_="65536",
    )
    for rank in range(case.tp):
        out = os.path.join(work_dir, f"{case.key}-rank{rank}.json")
        outs.append(out)
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(asdict(case))]
        command += ["--rank", str(rank), "--port", str(port), "--out", out]
        command += ["--ref-dir", work_dir] + shared
        with open(out + ".log", "w") as log:
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + args.row_timeout
    while any(proc.poll() is None for proc in procs):
        failed = any(proc.poll() not in (None, 0) for proc in procs)
        if failed or time.monotonic() > deadline:
            time.sleep(5 if failed else 0)  # a failed rank's peer waits in a collective
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            break
        time.sleep(0.2)
    ranks = []
    for proc, out in zip(procs, outs):
        proc.wait()
        if os.path.exists(out):
            with open(out) as f:
                ranks.append(json.load(f))
        else:
            with open(out + ".log") as f:
                tail = f.read().strip().splitlines()[-3:]
            ranks.append({"error": f"exit {proc.returncode}: " + " | ".join(tail)})
    # a rank's own exception first; its peers were only stopped
    failed = sorted((r for r in ranks if "error" in r), key=lambda r: "traceback" not in r)
    if failed:
        return {"error": failed[0]["error"], "traceback": failed[0].get("traceback", "")}
    merged = dict(ranks[0])
    for name in ("time_s", "peak_extra_mb", "loss_diff", "grad_h_diff", "grad_w_diff"):
        if name in merged:
            merged[name] = max(r[name] for r in ranks)
    return merged


def _collectives_text(counts: dict) -> str:
    if not counts:
        return "0"
    parts = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    return f"{sum(counts.values())} ({parts})"


def print_table(cases: list, rows: list) -> None:
    print(
        "| implementation | TP | teacher given as | fwd+bwd s | peak extra MB | "
        "collectives / micro-batch | loss / token | loss/token diff | max grad diff |"
    )
    print("|---" * 9 + "|")
    for case, row in zip(cases, rows):
        head = f"| {case.label} | {case.tp} | {case.teacher} |"
        if "error" in row:
            print(f"{head} failed | - | - | - | - | - |")
            continue
        if row.get("reference"):
            agree = "reference | reference"
        elif "loss_diff" in row:
            grad = max(row["grad_h_diff"], row["grad_w_diff"])
            agree = f"{row['loss_diff'] / max(row['num_valid'], 1):.1e} | {grad:.1e}"
        else:
            agree = "no reference | -"
        print(
            f"{head} {row['time_s']:.3f} | {row['peak_extra_mb']:.0f} | "
            f"{_collectives_text(row['collectives'])} | {row['loss_per_token']:.5f} | {agree} |",
            flush=True,
        )


def side_by_side(cases: list, rows: list) -> list:
    """Every peer row (eager torch included) against each megatron_pd row given the same
    inputs (TP, alpha, teacher as logits or hidden): time and peak-memory ratios ours / peer."""
    ours = [(c, r) for c, r in zip(cases, rows) if c.impl.startswith("mpd") and "error" not in r]
    pairs = []
    for case, row in zip(cases, rows):
        if case.impl.startswith("mpd") or "error" in row:
            continue
        for mine, mine_row in ours:
            if (mine.tp, mine.alpha, mine.teacher) != (case.tp, case.alpha, case.teacher):
                continue
            pairs.append(
                {
                    "peer": case.key,
                    "peer_label": case.label,
                    "ours": mine.key,
                    "ours_label": mine.label,
                    "tp": case.tp,
                    "teacher": case.teacher,
                    "time_ratio": mine_row["time_s"] / row["time_s"],
                    "memory_ratio": mine_row["peak_extra_mb"] / max(row["peak_extra_mb"], 1e-9),
                }
            )
    return pairs


def print_side_by_side(pairs: list) -> None:
    if not pairs:
        print("\nSide by side: no peer row ran beside a megatron_pd row with the same inputs")
        return
    print("\nSide by side: megatron_pd / peer on the same inputs (< 1: ours faster, smaller)\n")
    print("| peer | TP | megatron_pd row | teacher given as | time ratio | memory ratio |")
    print("|---" * 6 + "|")
    for pair in pairs:
        print(
            f"| {pair['peer_label']} | {pair['tp']} | {pair['ours_label']} | {pair['teacher']} | "
            f"{pair['time_ratio']:.2f} | {pair['memory_ratio']:.2f} |"
        )
    peers = sorted({pair["peer"] for pair in pairs})
    beaten = {p["peer"] for p in pairs if p["time_ratio"] < 1 and p["memory_ratio"] < 1}
    print(
        f"\npeer rows with a megatron_pd row both faster and smaller: "
        f"{len(beaten)} of {len(peers)}"
    )
    for peer in peers:
        if peer not in beaten:
            print(f"* not beaten on both: {peer}")


NOTES = """Conventions (all rows are brought to the same objective before comparing):
* loss = sum over non-ignored tokens; "loss / token" divides it by their number. Liger returns
  that mean: multiplied back by the count (its backward is scaled the same way).
* temperature divides student and teacher logits in every row, without a tau^2 factor; the
  hard CE is at tau = 1 (LossSpec(tau_squared=False); Liger and ModelOpt do the same).
* ModelOpt's LogitsKLLoss computes only the KL; with TP it returns each rank's share of the
  per-token KL (tp_reduce=True) and leaves masking, summing and the TP all-reduce of the
  scalar to Megatron-LM's loss_func: that consumer is reimplemented here. ModelOpt adds the LM
  loss through its loss balancer with a dynamic scale (KD rescaled to the LM loss), not a fixed
  alpha, so the "KL + mcore CE" row weights mcore's vocab_parallel_cross_entropy with alpha
  here. mcore's CE calls all_reduce on the TP group even when it has one rank.
* Liger fuses the teacher's GEMM (hidden + weight), so compare it with the megatron_pd fused
  row whose teacher is given the same way; TP=1 only (single device, no vocab parallelism).
* megatron_pd rows: impl="torch" (the "compiled" rows: impl="compiled"), metrics=False (no
  teacher entropy / top-1 agreement, which no peer computes), check_inputs=False (as the
  training engine runs it; the value checks add one MAX all-reduce at TP > 1 and a read of
  the logits). The logits path gets dL/dh summed over TP by copy_to_group, the fused path
  does that itself.
* collectives: c10d ops counted during one fwd+bwd (all-reduces of dL/dh included).
"""


def combine_rounds(results: list) -> dict:
    """One row from its rounds: the first round's values with the median time over the rounds
    (each a median of --repeats), the rounds' times beside it and the highest peak memory."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    row = dict(ok[0])
    times = [r["time_s"] for r in ok]
    row["time_s"], row["round_times_s"] = statistics.median(times), times
    for key in [k for k in row if k.endswith("_mb")]:
        row[key] = max(r[key] for r in ok)
    if "loss" in row:
        row["loss_per_token"] = row["loss"] / max(row["num_valid"], 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--teacher-hidden", type=int, default=None, help="default: --hidden")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the KL term")
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--ignore-frac", type=float, default=0.05, help="labels = ignore_index")
    parser.add_argument("--logit-scale", type=float, default=2.0, help="std of the logits")
    parser.add_argument("--liger-chunk", type=int, default=1024, help="Liger's chunk_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every row this many times, each round from another row; a "
                        "row's time is the median over its rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", nargs="+", choices=sorted(BUILDERS), help="default: all")
    parser.add_argument("--row-timeout", type=float, default=600.0, help="seconds per row")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--ref-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.teacher_hidden = args.teacher_hidden or args.hidden
    if args.worker:
        case = Case(**json.loads(args.worker))
        try:
            result = run_row(args, case, args.rank)
        except Exception as error:  # a peer that cannot run here is a result, not a crash
            result = {"error": f"{type(error).__name__}: {error}".strip()[:600]}
            result["traceback"] = traceback.format_exc()
        with open(args.out, "w") as f:
            json.dump(result, f)
        # skip interpreter teardown (gloo, compile workers): the result is out; a failure
        # exits non-zero so that the parent stops this rank's peers at once
        os._exit(1 if "error" in result else 0)

    cases = build_cases(args)
    versions = {}
    for name, dist_name in PEERS.items():
        try:
            versions[name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    num_valid_est = "~" + str(round(args.tokens * (1 - args.ignore_frac)))
    print(
        f"N={args.tokens} tokens ({num_valid_est} not ignored), H={args.hidden}, "
        f"H_teacher={args.teacher_hidden}, V={args.vocab}, fp32 on CPU, tau={args.tau}, "
        f"median of {args.repeats} after 1 warm-up, median over {args.rounds} round(s); "
        f"TP=1: 1 process x 2 threads, TP=2: "
        f"2 gloo ranks x 1 thread"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")
    runs = [[] for _ in cases]
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as work_dir:
        for index in range(args.rounds):  # each round starts at another row: drift spreads
            shift = index * len(cases) // max(args.rounds, 1)
            for at in list(range(shift, len(cases))) + list(range(shift)):
                runs[at].append(launch_row(args, cases[at], work_dir))
    rows = [combine_rounds(results) for results in runs]
    print_table(cases, rows)
    pairs = side_by_side(cases, rows)
    print_side_by_side(pairs)
    failures = [(case, row) for case, row in zip(cases, rows) if "error" in row]
    if failures:
        print("\nRows that could not run:")
        for case, row in failures:
            print(f"* {case.label} TP={case.tp}: {row['error']}")
    print("\n" + NOTES)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            record = {"args": vars(args), "versions": versions, "notes": NOTES}
            record["rows"] = [{**asdict(c), **r} for c, r in zip(cases, rows)]
            record["side_by_side"] = pairs
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
