"""Benchmark the fused distillation loss against eager PyTorch, side by side, on CPU.

    python tools/bench_distill_loss.py                 # V = 151552, 128256, 32000; 4 losses
    python tools/bench_distill_loss.py --vocab 32000 --tokens 128 --losses forward_kl

For each vocabulary size and loss (objective (1 - alpha) * CE + alpha * KD, alpha = 0.9):
  * CPU time of forward + backward (median of --repeats, both paths on the same inputs)
  * peak extra memory (VmHWM after resetting it, minus RSS before; each measured in a fresh
    subprocess) and bytes allocated per logit element (every op output counted)
  * for the first vocabulary: per-rank peak at TP=2 (2 gloo processes) vs TP=1
  * the fused path's analytic HBM bytes per token (bf16 logits) and the implied roofline
    tokens/s on one H200 (4.8 TB/s)
The eager baseline is what one writes with torch: log_softmax + kl_div (forward/reverse KL),
cross_entropy with probability targets (soft CE), log_softmax + gather over the kept entries
(sparse top-p-k), plus cross_entropy for the hard labels, all differentiated by autograd.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LOSSES = ("forward_kl", "reverse_kl", "soft_ce", "sparse_topk")
H200_BYTES_PER_S = 4.8e12


# ------------------------------------------------------------------ the two implementations
def make_inputs(tokens: int, vocab: int, keep: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(tokens, vocab, generator=g) * 2
    teacher = torch.randn(tokens, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    logp = torch.log_softmax(teacher[:, : min(vocab, 65536)], -1)  # kept entries: a top-k
    values, index = logp.topk(keep, -1)
    return {"student": student, "teacher": teacher, "labels": labels, "idx": index, "logp": values}


def run_eager(inputs: dict, loss: str, alpha: float = 0.9, tau: float = 1.0):
    F = torch.nn.functional
    x = inputs["student"].detach().requires_grad_()
    ce = F.cross_entropy(x, inputs["labels"], reduction="none")
    log_p = F.log_softmax(x / tau, -1)
    if loss == "forward_kl":
        log_t = F.log_softmax(inputs["teacher"] / tau, -1)
        kd = F.kl_div(log_p, log_t, log_target=True, reduction="none").sum(-1)
    elif loss == "reverse_kl":
        log_t = F.log_softmax(inputs["teacher"] / tau, -1)
        kd = F.kl_div(log_t, log_p, log_target=True, reduction="none").sum(-1)
    elif loss == "soft_ce":
        kd = F.cross_entropy(x / tau, F.softmax(inputs["teacher"] / tau, -1), reduction="none")
    else:
        q = torch.softmax(inputs["logp"] / tau, -1)
        kd = -(q * log_p.gather(1, inputs["idx"])).sum(-1)
    ((1 - alpha) * ce + alpha * kd).sum().backward()
    return x.grad


def run_fused(
    inputs: dict,
    loss: str,
    alpha: float = 0.9,
    tau: float = 1.0,
    group=None,
    rank: int = 0,
    world: int = 1,
):
    import torch.distributed as dist

    from megatron_pd.loss.objective import distillation_loss
    from megatron_pd.loss.spec import DenseTeacher, LossSpec, SparseTeacher
    from megatron_pd.parallel.vocab import VocabInfo

    vocab = inputs["student"].shape[1]
    width = vocab // world
    columns = slice(rank * width, (rank + 1) * width)
    x = inputs["student"][:, columns].detach().requires_grad_()
    if loss == "sparse_topk":
        teacher = SparseTeacher(inputs["idx"], inputs["logp"])
        kind = "soft_ce"
    else:
        teacher = DenseTeacher(inputs["teacher"][:, columns])
        kind = loss
    spec = LossSpec(kind=kind, alpha=alpha, tau=tau)
    # metrics=False: the eager baseline computes no teacher entropy / top-1 agreement either.
    # The public entry point with every input check on (what a direct caller gets).
    out = distillation_loss(
        x,
        inputs["labels"],
        teacher,
        spec,
        VocabInfo(vocab, vocab, world, rank),
        group or dist.group.WORLD,
        impl="torch",
        metrics=False,
        check_inputs=True,
    )
    out["loss"].sum().backward()
    return x.grad


# ------------------------------------------------------------------ measurements
class _AllocationCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums the bytes of every new storage an op returns (views, in-place and out= results
    write into existing memory and are not counted)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        known = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.nbytes() > 0 and storage.data_ptr() not in known:
                    self.bytes += storage.nbytes()
                    known.add(storage.data_ptr())
        return out


def _init_gloo(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)


def measure_memory_child(args) -> dict:
    """Inside a fresh process: peak extra memory (and allocations) of one fwd+bwd."""
    rank, world = args.rank, args.world
    torch.set_num_threads(1)
    _init_gloo(rank, world, args.port)
    import megatron_pd.loss.vocab_parallel  # noqa: F401  (imports are not the loss's memory)

    inputs = make_inputs(args.tokens, args.vocab, args.keep)
    if args.impl == "fused" and world > 1:  # keep only this rank's shard, as TP would
        width = args.vocab // world
        cols = slice(rank * width, (rank + 1) * width)
        inputs["student"] = inputs["student"][:, cols].clone()
        inputs["teacher"] = inputs["teacher"][:, cols].clone()
    from megatron_pd.platform.peak_memory import PeakMemory

    def once():
        if args.impl == "eager":
            run_eager(inputs, args.loss)
        elif world > 1:
            import torch.distributed as dist

            from megatron_pd.loss.spec import DenseTeacher, LossSpec, SparseTeacher
            from megatron_pd.loss.vocab_parallel import fused_distill_loss
            from megatron_pd.parallel.vocab import VocabInfo

            x = inputs["student"].detach().requires_grad_()
            teacher = (
                SparseTeacher(inputs["idx"], inputs["logp"])
                if args.loss == "sparse_topk"
                else DenseTeacher(inputs["teacher"])
            )
            kind = "soft_ce" if args.loss == "sparse_topk" else args.loss
            out = fused_distill_loss(
                x,
                inputs["labels"],
                teacher,
                LossSpec(kind=kind, alpha=0.9),
                VocabInfo(args.vocab, args.vocab, world, rank),
                dist.group.WORLD,
                metrics=False,
            )
            out["loss"].sum().backward()
        else:
            run_fused(inputs, args.loss)

    with PeakMemory() as peak:
        once()
    counter = _AllocationCounter()  # a second, separate run counts the allocations
    with counter:
        once()
    return {
        "extra_mb": peak.extra_mb,
        "exact_peak": peak.exact,
        "alloc_bytes": counter.bytes,
        "elements": args.tokens * args.vocab // world,
    }


def measure_memory(
    impl: str, loss: str, vocab: int, tokens: int, keep: int, world: int = 1
) -> list:
    """Spawn ``world`` fresh processes; returns their results."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                "--impl",
                impl,
                "--losses",
                loss,
                "--vocab",
                str(vocab),
                "--tokens",
                str(tokens),
                "--keep",
                str(keep),
                "--rank",
                str(rank),
                "--world",
                str(world),
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            text=True,
            # A fixed mmap threshold: every big buffer is returned to the OS when freed, so the
            # peak RSS is the peak of live allocations, not of glibc's arena growth.
            env=dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536"),
        )
        for rank in range(world)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed ({impl} {loss} V={vocab})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def time_both(inputs: dict, loss: str, repeats: int) -> tuple:
    times = {"eager": [], "fused": []}
    run_fused(inputs, loss)  # warm-up both paths (first-touch page faults)
    run_eager(inputs, loss)
    for _ in range(repeats):
        for name, fn in (("eager", run_eager), ("fused", run_fused)):
            start = time.perf_counter()
            fn(inputs, loss)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["eager"]), statistics.median(times["fused"])


def check_agreement(inputs: dict, loss: str) -> float:
    return (run_eager(inputs, loss) - run_fused(inputs, loss)).abs().max().item()


def hbm_bytes_per_token(vocab: int, loss: str, keep: int, logit_bytes: int = 2) -> int:
    """Bytes the fused path moves per token (bf16 logits): forward reads student (+ dense
    teacher) once; backward reads them again and writes the gradient once. Per-token
    statistics and sparse entries (8 bytes each, twice) are counted too."""
    dense = loss != "sparse_topk"
    reads = (2 if dense else 1) * 2  # forward + backward
    writes = 1
    per_token = (reads + writes) * vocab * logit_bytes + 64
    if not dense:
        per_token += 2 * keep * 8
    return per_token


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[151552, 128256, 32000])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--keep", type=int, default=50, help="kept entries of the sparse loss")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-tp", action="store_true", help="skip the TP=2 memory check")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.vocab, args.loss = args.vocab[0], args.losses[0]
        print(json.dumps(measure_memory_child(args)))
        return 0

    from megatron_pd.platform import quiet_known_warnings

    quiet_known_warnings()
    torch.set_num_threads(args.threads)
    _init_gloo(0, 1, _free_port())
    print(
        f"fused vs eager, {args.tokens} tokens, fp32 logits on CPU, {args.threads} thread(s), "
        f"objective 0.1*CE + 0.9*KD, sparse keeps {args.keep} entries/token\n"
    )
    header = (
        "| V | loss | time eager s | time fused s | time ratio | peak extra eager MB | "
        "peak extra fused MB | memory ratio | bytes/elem eager | bytes/elem fused | "
        "max grad diff |"
    )
    print(header)
    print("|---" * 11 + "|")
    rows = []
    for vocab in args.vocab:
        inputs = make_inputs(args.tokens, vocab, args.keep)
        for loss in args.losses:
            eager_s, fused_s = time_both(inputs, loss, args.repeats)
            diff = check_agreement(inputs, loss)
            mem = {
                impl: measure_memory(impl, loss, vocab, args.tokens, args.keep)[0]
                for impl in ("eager", "fused")
            }
            elements = args.tokens * vocab
            row = {
                "vocab": vocab,
                "loss": loss,
                "eager_s": eager_s,
                "fused_s": fused_s,
                "time_ratio": fused_s / eager_s,
                "eager_mb": mem["eager"]["extra_mb"],
                "fused_mb": mem["fused"]["extra_mb"],
                "memory_ratio": mem["fused"]["extra_mb"] / mem["eager"]["extra_mb"],
                "eager_bpe": mem["eager"]["alloc_bytes"] / elements,
                "fused_bpe": mem["fused"]["alloc_bytes"] / elements,
                "grad_diff": diff,
            }
            rows.append(row)
            print(
                f"| {vocab} | {loss} | {eager_s:.3f} | {fused_s:.3f} | "
                f"{row['time_ratio']:.2f} | {row['eager_mb']:.0f} | {row['fused_mb']:.0f} | "
                f"{row['memory_ratio']:.2f} | {row['eager_bpe']:.1f} | {row['fused_bpe']:.1f} | "
                f"{diff:.1e} |",
                flush=True,
            )
        del inputs
    if not args.no_tp:
        vocab = args.vocab[0]
        print(f"\nTP=2 vs TP=1, fused forward_kl, V={vocab}: per-rank peak extra memory")
        one = measure_memory("fused", "forward_kl", vocab, args.tokens, args.keep)[0]
        two = measure_memory("fused", "forward_kl", vocab, args.tokens, args.keep, world=2)
        worst = max(r["extra_mb"] for r in two)
        print(
            f"TP=1 {one['extra_mb']:.0f} MB, TP=2 max per rank {worst:.0f} MB, "
            f"ratio {worst / one['extra_mb']:.2f} (target <= 0.6)"
        )
    print("\nFused path, analytic HBM traffic with bf16 logits, roofline on one H200 (4.8 TB/s):")
    print("| V | loss | bytes/token | roofline tokens/s |")
    print("|---|---|---|---|")
    for vocab in args.vocab:
        for loss in args.losses:
            per_token = hbm_bytes_per_token(vocab, loss, args.keep)
            print(f"| {vocab} | {loss} | {per_token:,} | {H200_BYTES_PER_S / per_token:,.0f} |")
    ratios_t = [r["time_ratio"] for r in rows]
    ratios_m = [r["memory_ratio"] for r in rows]
    print(
        f"\nworst time ratio {max(ratios_t):.2f} (target <= 0.5), worst memory ratio "
        f"{max(ratios_m):.2f} (target <= 0.40, stretch 0.25)"
    )
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
