"""Benchmark online distillation's step time against LM-only training, side by side, on CPU.

    python tools/bench_online_pd.py            # ~6 minutes on 2 cores

Part 1 - cost model. A PD step trains the student (3 x its forward FLOPs) and runs the teacher
forward once, so PD time / LM time should be 1 + F_teacher / (3 F_student), F = forward FLOPs
per token with attention and the LM head counted (engine/flops.py). Measured on models whose
matmuls dominate and have the same shapes (the teacher is 4x deeper), alternating LM and PD
steps in one process.

Part 2 - a 2x wider teacher. The FLOP model assumes the teacher's forward runs at the FLOP
rate of the student's train step; a wider model does not: its per-token work outside the
GEMMs (norms, rotary, softmax, residual adds: O(L H) per token) is a smaller share of its
O(L H^2) FLOPs. Every part therefore also prints the teacher's own seconds in the PD step (the
module's clock), the two FLOP rates, and the time prediction 1 + T_teacher / T_lm, whose
deviation is what the PD step costs beyond a student step and a teacher forward (the loss,
truncation, exchange). The pure-GEMM rates on each model's layer shapes are printed too: they
differ by a few percent only, so GEMM size is not what makes the wider teacher cheaper.

Part 3 - the loss at a large vocabulary-to-hidden ratio (V = 32000, H = 64), where the output
layer and the distillation loss rather than the layers dominate: the PD step with the fused
output layer (the default), with the logits path (loss.fused_output_layer=false) and with an
eager PyTorch KD loss on logits (log_softmax + kl_div + cross_entropy, autograd).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _config(
    student: dict, teacher: dict, teacher_load: str | None, seq: int, vocab: int, *extra: str
):
    from megatron_pd.config import load_config

    args = [f"--model.{k}={v}" for k, v in student.items()] + list(extra)
    args += [
        f"--model.vocab_size={vocab}",
        f"--data.seq_length={seq}",
        "--train.micro_batch_size=4",
        "--train.global_batch_size=8",
        "--train.precision=fp32",
        "--optimizer.name=adamw",
    ]
    if teacher_load:
        args += [f"--distill.teacher.load={teacher_load}", "--distill.alpha.value=0.9"]
        args += [f"--distill.teacher.model.{k}={v}" for k, v in teacher.items()]
        args += [f"--distill.teacher.model.vocab_size={vocab}"]
    return load_config(None, args)


def _batches(cfg, step: int):
    g = torch.Generator().manual_seed(step)
    size, seq = cfg.train.micro_batch_size, cfg.data.seq_length
    out = []
    for _ in range(cfg.train.global_batch_size // size):
        text = torch.randint(0, cfg.model.vocab_size, (size, seq + 1), generator=g)
        out.append(
            {
                "tokens": text[:, :-1].contiguous(),
                "labels": text[:, 1:].contiguous(),
                "loss_mask": torch.ones(size, seq),
                "position_ids": torch.arange(seq).expand(size, seq).contiguous(),
            }
        )
    return out


def _save_teacher(teacher: dict, seq: int, vocab: int, root: str) -> None:
    from megatron_pd.config import load_config
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.models.checkpoint import CheckpointManager
    from megatron_pd.parallel import topology

    args = [f"--model.{k}={v}" for k, v in teacher.items()]
    cfg = load_config(
        None,
        args
        + [f"--model.vocab_size={vocab}", f"--data.seq_length={seq}", "--train.precision=fp32"],
    )
    module = TrainModule(cfg, topology.init_student_groups(1, 1), vocab, 1)
    CheckpointManager(root).save(module, 1, {"step": 1})


def _eager_loss_terms(module):
    """loss_terms of the distillation module, computed the eager way (for part 2)."""
    F = torch.nn.functional

    def loss_terms(student, batch, mask_N):
        teacher = batch.get("teacher") or module._payloads[batch["microbatch"]]
        s = student.logits.float()
        t = teacher.logits.float()
        kd = F.kl_div(
            F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none"
        ).sum(-1)
        ce = F.cross_entropy(s, batch["labels"].reshape(-1), reduction="none")
        loss = (1 - module.alpha) * ce + module.alpha * kd
        terms = {"loss": loss.detach(), "lm_loss": ce.detach(), "kd_loss": kd.detach()}
        return (loss * mask_N).sum(), terms

    return loss_terms


def _matmul_rate(model: dict, tokens: int, repeats: int = 5) -> float:
    """FLOP/s of this CPU on the model's layer GEMMs (QKV+proj as H x H, MLP as H x FFN) for
    ``tokens`` rows: the rate its forward runs at, measured, not assumed."""
    hidden, ffn = model["hidden_size"], model["ffn_hidden_size"]
    x = torch.randn(tokens, hidden)
    shapes = [torch.randn(hidden, 3 * hidden), torch.randn(hidden, 2 * ffn)]
    shapes.append(torch.randn(ffn, hidden))
    inputs = [x, x, torch.randn(tokens, ffn)]
    flops = sum(2.0 * a.shape[0] * a.shape[1] * w.shape[1] for a, w in zip(inputs, shapes))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for a, w in zip(inputs, shapes):
            a @ w
        best = min(best, time.perf_counter() - start)
    return flops / best


def _time_steps(modules: dict, cfg, steps: int) -> dict:
    """Median step seconds per module, and ("<name>_teacher") the seconds of a distillation
    step its teacher took (forward, truncation and exchange: the module's own clock)."""
    times = {name: [] for name in modules}
    teacher = {name: [] for name in modules}
    for step in range(steps + 1):
        batches = _batches(cfg, step)
        for name, (module, kwargs) in modules.items():
            start = time.perf_counter()
            result = module.train_step(batches, lr=1e-4, **kwargs)
            seconds = time.perf_counter() - start
            if step:  # the first step warms up allocations
                times[name].append(seconds)
                share = result.extras.get("teacher_time_share") if result.extras else None
                if share is not None:
                    teacher[name].append(share * seconds)
    out = {name: statistics.median(values) for name, values in times.items()}
    out.update({f"{n}_teacher": statistics.median(v) for n, v in teacher.items() if v})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=("cost", "wider", "vocab"),
                        default=["cost", "wider", "vocab"], help="which parts to run")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from megatron_pd.engine.distill_module import DistillTrainModule
    from megatron_pd.engine.flops import forward_flops_per_token
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.parallel import topology
    from megatron_pd.parallel.vocab import padded_vocab_size
    from megatron_pd.platform import quiet_known_warnings

    quiet_known_warnings()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29577")
    topology.init_distributed()
    groups = topology.init_student_groups(1, 1)

    base_student = dict(
        num_layers=4,
        hidden_size=512,
        ffn_hidden_size=1408,
        num_attention_heads=8,
        num_query_groups=4,
    )
    parts = {
        "cost model": dict(
            student=base_student,
            # Deeper, not wider: matmuls of the same shapes run at the same FLOP rate on a
            # CPU, so the comparison isolates the framework's overheads.
            teacher=dict(base_student, num_layers=16, tie_embeddings=False),
            seq=256,
            vocab=4096,
        ),
        "wider teacher": dict(
            student=base_student,
            teacher=dict(
                base_student,
                num_layers=8,
                hidden_size=1024,
                ffn_hidden_size=2816,
                tie_embeddings=False,
            ),
            seq=256,
            vocab=4096,
        ),
        "large V/H": dict(
            student=dict(
                num_layers=2,
                hidden_size=64,
                ffn_hidden_size=176,
                num_attention_heads=4,
                num_query_groups=2,
            ),
            teacher=dict(
                num_layers=2,
                hidden_size=128,
                ffn_hidden_size=352,
                num_attention_heads=4,
                num_query_groups=2,
                tie_embeddings=False,
            ),
            seq=128,
            vocab=32000,
        ),
    }
    print(
        f"CPU, {args.threads} thread(s), fp32, global batch 8 x seq, median of {args.steps} steps\n"
    )
    chosen = {"cost": "cost model", "wider": "wider teacher", "vocab": "large V/H"}
    parts = {chosen[p]: parts[chosen[p]] for p in args.parts}
    for title, part in parts.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = os.path.join(tmp, "teacher")
            _save_teacher(part["teacher"], part["seq"], part["vocab"], root)
            shape = (part["student"], part["teacher"])
            lm_cfg = _config(*shape, None, part["seq"], part["vocab"])
            pd_cfg = _config(*shape, root, part["seq"], part["vocab"])
            lm = TrainModule(lm_cfg, groups, part["vocab"], 1)
            pd = DistillTrainModule(pd_cfg, groups, part["vocab"], 1)
            modules = {"lm": (lm, {}), "pd": (pd, {"alpha": 0.9, "tau": 1.0})}
            if title == "large V/H":
                logits_cfg = _config(
                    *shape, root, part["seq"], part["vocab"], "--loss.fused_output_layer=false"
                )
                logits_path = DistillTrainModule(logits_cfg, groups, part["vocab"], 1)
                modules["pd_logits_path"] = (logits_path, {"alpha": 0.9, "tau": 1.0})
                eager = DistillTrainModule(logits_cfg, groups, part["vocab"], 1)
                eager.loss_terms = _eager_loss_terms(eager)
                modules["pd_eager_loss"] = (eager, {"alpha": 0.9, "tau": 1.0})
            times = _time_steps(modules, lm_cfg, args.steps)
        padded = padded_vocab_size(part["vocab"], 128, 1)
        f_student = forward_flops_per_token(lm_cfg.model, padded, part["seq"])
        f_teacher = forward_flops_per_token(pd_cfg.distill.teacher.model, padded, part["seq"])
        predicted = 1 + f_teacher / (3 * f_student)
        measured = times["pd"] / times["lm"]
        print(
            f"== {title}: student {f_student / 1e6:.1f} MFLOP/token forward, teacher "
            f"{f_teacher / 1e6:.1f} MFLOP/token forward, V={part['vocab']}"
        )
        print(
            f"LM step {times['lm']:.3f}s | PD step {times['pd']:.3f}s | measured ratio "
            f"{measured:.3f} | FLOP prediction 1 + F_t/(3 F_s) = {predicted:.3f} | "
            f"deviation {100 * (measured / predicted - 1):+.1f}% (target within +-10%)"
        )
        if "pd_teacher" in times:
            t_teacher = times["pd_teacher"]
            tokens = lm_cfg.train.global_batch_size * part["seq"]
            rate_train = 3 * f_student * tokens / times["lm"]
            rate_teacher = f_teacher * tokens / t_teacher
            timed = 1 + t_teacher / times["lm"]
            print(
                f"teacher {t_teacher:.3f}s of the PD step | FLOP rate: student train step "
                f"{rate_train / 1e9:.1f}, teacher forward {rate_teacher / 1e9:.1f} GFLOP/s "
                f"({rate_teacher / rate_train:.2f}x) | time prediction 1 + T_teacher/T_lm = "
                f"{timed:.3f} | deviation {100 * (measured / timed - 1):+.1f}% (the PD step's "
                "cost beyond its student step and its teacher's forward)"
            )
        if title == "wider teacher":
            tokens = lm_cfg.train.micro_batch_size * part["seq"]
            rate_s = _matmul_rate(part["student"], tokens)
            rate_t = _matmul_rate(part["teacher"], tokens)
            corrected = 1 + (f_teacher / rate_t) / (3 * f_student / rate_s)
            print(
                f"matmul rate on the layer shapes: student {rate_s / 1e9:.1f}, teacher "
                f"{rate_t / 1e9:.1f} GFLOP/s ({rate_t / rate_s:.2f}x) | rate-corrected "
                f"prediction {corrected:.3f} | deviation {100 * (measured / corrected - 1):+.1f}%"
            )
        if "pd_logits_path" in times:
            print(
                f"PD step with the logits path {times['pd_logits_path']:.3f}s: fused output "
                f"layer / logits path {times['pd'] / times['pd_logits_path']:.2f}"
            )
        if "pd_eager_loss" in times:
            excess = times["pd_eager_loss"] - times["pd"]
            print(
                f"PD step with an eager KD loss {times['pd_eager_loss']:.3f}s: the eager "
                f"loss costs {excess:.3f}s more per step ({100 * excess / times['pd']:+.0f}% "
                f"of the fused PD step)"
            )
        print()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
