"""GPU readiness report: the checks a CPU machine cannot make, in one run, as JSON.

    bash tools/gpu_check.sh                      # on one GPU (H200: under 8 minutes)
    python tools/gpu_check.py --smoke            # the same logic at tiny shapes on CPU

Each check records its numbers or its error (one failing check does not stop the others):
  gpu_tests        the GPU test tier (pytest -m gpu): passed / failed counts
  triton_vs_torch  the Triton kernels against the torch path, bf16 logits, V=151,552: loss and
                   gradient differences, and each path's time
  roofline         the fused loss (Triton, bf16, dense teacher) in tokens/s against the HBM
                   roofline of its bytes moved per token (4.8 TB/s on H200); target >= 60%
  fused_output     output layer + loss at the 1.9B student's shapes (H=2048, V=151,552, seq
                   4096 x micro batch 4): peak memory above the inputs and time, fused vs the
                   logits path; targets memory <= 0.15x, time <= 1.10x
  online_pd        a PD step (student-1.9b shape, a glm4-9b-shaped teacher with few layers)
                   over an LM-only step, against the FLOP model 1 + F_t / (3 F_s)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

H200_BYTES_PER_S = 4.8e12


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int = 3) -> float:
    fn()  # warm-up (compilation, allocator)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _group():
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1)
        from megatron_pd.parallel import topology

        topology.init_distributed()
    return dist.group.WORLD


# ------------------------------------------------------------------------------ checks
def check_gpu_tests(args, device) -> dict:
    if args.smoke:
        return {"skipped": "smoke run (no GPU)"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=args.test_timeout,
    )
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return {"returncode": done.returncode, "summary": last, "tail": done.stdout[-2000:]}


def check_triton_vs_torch(args, device) -> dict:
    from megatron_pd.loss import triton_kernels
    from megatron_pd.loss.spec import DenseTeacher, LossSpec, SparseTeacher
    from megatron_pd.loss.vocab_parallel import fused_distill_loss
    from megatron_pd.parallel.vocab import VocabInfo

    usable, why = triton_kernels.triton_available()
    if not usable:
        return {"skipped": f"triton cannot run: {why}"}
    tokens, vocab = args.shape("triton_tokens"), args.shape("vocab")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    student = (torch.randn(tokens, vocab, device=device, generator=g) * 2).to(dtype)
    teacher = (torch.randn(tokens, vocab, device=device, generator=g) * 2).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    ids = torch.stack([torch.randperm(vocab, device=device)[:50] for _ in range(tokens)])
    logp = torch.log_softmax(torch.randn(tokens, 50, device=device, generator=g), -1) - 0.1
    info = VocabInfo(vocab, vocab, 1, 0)
    out = {}
    for name, spec, t in (
        (
            "forward_kl_dense",
            LossSpec(kind="forward_kl", alpha=0.9, tau=2.0),
            DenseTeacher(teacher),
        ),
        ("reverse_kl_dense", LossSpec(kind="reverse_kl", alpha=0.9), DenseTeacher(teacher)),
        ("forward_kl_top50", LossSpec(kind="forward_kl", alpha=0.9), SparseTeacher(ids, logp)),
    ):
        results, times = {}, {}
        for impl in ("torch", "triton"):
            x = student.clone().requires_grad_()

            def step(x=x, impl=impl, t=t, spec=spec):
                x.grad = None
                loss = fused_distill_loss(x, labels, t, spec, info, _group(), impl=impl)["loss"]
                loss.sum().backward()
                return loss

            times[impl] = _timed(step, device)
            loss = step()
            results[impl] = (loss.detach().float(), x.grad.float())
        out[name] = {
            "loss_max_abs_diff": (results["triton"][0] - results["torch"][0]).abs().max().item(),
            "grad_max_abs_diff": (results["triton"][1] - results["torch"][1]).abs().max().item(),
            "torch_s": times["torch"],
            "triton_s": times["triton"],
        }
    return out


def check_roofline(args, device) -> dict:
    from bench_distill_loss import hbm_bytes_per_token

    from megatron_pd.loss import triton_kernels
    from megatron_pd.loss.spec import DenseTeacher, LossSpec
    from megatron_pd.loss.vocab_parallel import fused_distill_loss
    from megatron_pd.parallel.vocab import VocabInfo

    usable, why = triton_kernels.triton_available()
    impl = "triton" if usable and device.type == "cuda" else "torch"
    tokens, vocab = args.shape("roofline_tokens"), args.shape("vocab")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = (torch.randn(tokens, vocab, device=device) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(tokens, vocab, device=device) * 2).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    spec = LossSpec(kind="forward_kl", alpha=0.9)
    info = VocabInfo(vocab, vocab, 1, 0)

    def step():
        student.grad = None
        loss = fused_distill_loss(
            student, labels, DenseTeacher(teacher), spec, info, _group(), impl=impl, metrics=False
        )["loss"]
        loss.sum().backward()

    seconds = _timed(step, device)
    per_token = hbm_bytes_per_token(vocab, "forward_kl", 0, student.element_size())
    roofline = H200_BYTES_PER_S / per_token
    achieved = tokens / seconds
    return {
        "impl": impl,
        "tokens_per_s": achieved,
        "bytes_per_token": per_token,
        "roofline_tokens_per_s": roofline,
        "fraction_of_roofline": achieved / roofline,
        "target": 0.6,
    }


def _output_layer_step(
    path: str, hidden, weight, labels, teacher, spec, info, impl: str, chunk: int | None = None
):
    from megatron_pd.loss.fused_linear import fused_linear_distillation_loss
    from megatron_pd.loss.objective import distillation_loss

    hidden.grad = None
    if path == "logits":
        logits = hidden @ weight.t()
        out = distillation_loss(
            logits, labels, teacher, spec, info, _group(), impl=impl, metrics=False
        )
        loss = out["loss"].sum()
        loss.backward()
        if weight.grad is not None:  # megatron DDP's hook: into main_grad, then freed
            weight.main_grad.add_(weight.grad)
            weight.grad = None
    else:
        weight.grad_added_to_main_grad = False
        mask = torch.ones(hidden.shape[0], device=hidden.device)
        out = fused_linear_distillation_loss(
            hidden,
            weight,
            labels,
            mask,
            teacher,
            spec,
            info,
            _group(),
            impl=impl,
            metrics=False,
            grad_scale=1.0,
            chunk_tokens=chunk,
        )
        out["weighted"].backward()
        weight.grad = None


def check_fused_output(args, device) -> dict:
    from megatron_pd.loss import triton_kernels
    from megatron_pd.loss.spec import LossSpec, SparseTeacher
    from megatron_pd.parallel.vocab import VocabInfo

    usable, _ = triton_kernels.triton_available()
    impl = "triton" if usable and device.type == "cuda" else "torch"
    tokens, hidden_size, vocab = (args.shape(k) for k in ("output_tokens", "hidden", "vocab"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = (torch.randn(tokens, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    hidden.requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device) * 2).to(dtype).requires_grad_()
    weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=device)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    ids = torch.stack([torch.randperm(vocab, device=device)[:50] for _ in range(8)])
    ids = ids.repeat(tokens // 8 + 1, 1)[:tokens]
    logp = torch.log_softmax(torch.randn(tokens, 50, device=device), -1) - 0.05
    teacher = SparseTeacher(ids, logp)
    spec, info = LossSpec(kind="forward_kl", alpha=0.9), VocabInfo(vocab, vocab, 1, 0)
    from megatron_pd.loss.fused_linear import default_fused_chunk

    chunk = default_fused_chunk(vocab, device.type)
    out = {"impl": impl, "tokens": tokens, "default_chunk": chunk}
    # the default chunk, and half and double it (what a retune of default_fused_chunk reads)
    runs = [("logits", None), ("fused", chunk), ("fused_half_chunk", max(chunk // 2, 1)),
            ("fused_double_chunk", chunk * 2)]
    for name, rows in runs:

        def step(path=name.split("_")[0], rows=rows):
            _output_layer_step(path, hidden, weight, labels, teacher, spec, info, impl, rows)

        step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            seconds = _timed(step, device, repeats=2)
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            from megatron_pd.platform.peak_memory import PeakMemory

            with PeakMemory() as peak:
                seconds = _timed(step, device, repeats=1)
            extra = peak.extra_mb
        out[name] = {"chunk": rows, "seconds": seconds, "peak_extra_mb": extra}
        if name != "logits":
            out[name]["time_ratio"] = seconds / out["logits"]["seconds"]
            out[name]["memory_ratio"] = extra / max(out["logits"]["peak_extra_mb"], 1e-9)
    out["memory_ratio"] = out["fused"]["peak_extra_mb"] / max(out["logits"]["peak_extra_mb"], 1e-9)
    out["time_ratio"] = out["fused"]["seconds"] / out["logits"]["seconds"]
    out["targets"] = {"memory_ratio": 0.15, "time_ratio": 1.10}
    return out


def check_online_pd(args, device) -> dict:
    from bench_online_pd import _batches, _save_teacher

    from megatron_pd.config import load_config
    from megatron_pd.config.presets import MODEL_PRESETS
    from megatron_pd.engine.distill_module import DistillTrainModule
    from megatron_pd.engine.flops import forward_flops_per_token
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.parallel import topology
    from megatron_pd.parallel.vocab import padded_vocab_size

    _group()
    groups = topology.init_student_groups(1, 1)
    seq, vocab = args.shape("pd_seq"), args.shape("vocab")
    student = dict(MODEL_PRESETS["student-1.9b"], num_layers=args.shape("student_layers"))
    teacher = dict(MODEL_PRESETS["glm4-9b"], num_layers=args.shape("teacher_layers"))
    if args.smoke:
        student = dict(
            student, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2
        )
        teacher = dict(
            teacher, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2
        )
    for shape in (student, teacher):
        shape.pop("vocab_size", None)
    precision = "bf16" if device.type == "cuda" else "fp32"

    def config(teacher_root=None):
        extra = [f"--model.{k}={v}" for k, v in student.items()]
        extra += [
            f"--model.vocab_size={vocab}",
            f"--data.seq_length={seq}",
            "--train.micro_batch_size=1",
            "--train.global_batch_size=2",
            f"--train.precision={precision}",
            "--optimizer.name=adamw",
            "--distill.truncation=top-0.95-50",
        ]
        if teacher_root:
            extra += [
                f"--distill.teacher.load={teacher_root}",
                "--distill.alpha.value=0.9",
                f"--distill.teacher.precision={precision}",
            ]
            extra += [f"--distill.teacher.model.{k}={v}" for k, v in teacher.items()]
            extra += [f"--distill.teacher.model.vocab_size={vocab}"]
        return load_config(None, extra)

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "teacher")
        _save_teacher(teacher, seq, vocab, root)
        lm_cfg, pd_cfg = config(), config(root)
        lm = TrainModule(lm_cfg, groups, vocab, 1)
        pd = DistillTrainModule(pd_cfg, groups, vocab, 1)
        times = {"lm": [], "pd": []}
        for step in range(args.shape("pd_steps") + 1):
            batches = _batches(lm_cfg, step)
            for name, module, kwargs in (("lm", lm, {}), ("pd", pd, {"alpha": 0.9, "tau": 1.0})):
                _sync(device)
                start = time.perf_counter()
                module.train_step(batches, lr=1e-5, **kwargs)
                _sync(device)
                if step:
                    times[name].append(time.perf_counter() - start)
    padded = padded_vocab_size(vocab, 128, 1)
    f_student = forward_flops_per_token(lm_cfg.model, padded, seq)
    f_teacher = forward_flops_per_token(pd_cfg.distill.teacher.model, padded, seq)
    lm_s = sorted(times["lm"])[len(times["lm"]) // 2]
    pd_s = sorted(times["pd"])[len(times["pd"]) // 2]
    predicted = 1 + f_teacher / (3 * f_student)
    return {
        "lm_step_s": lm_s,
        "pd_step_s": pd_s,
        "measured_ratio": pd_s / lm_s,
        "flop_prediction": predicted,
        "deviation": pd_s / lm_s / predicted - 1,
        "student_layers": student["num_layers"],
        "teacher_layers": teacher["num_layers"],
    }


CHECKS = {
    "gpu_tests": check_gpu_tests,
    "triton_vs_torch": check_triton_vs_torch,
    "roofline": check_roofline,
    "fused_output": check_fused_output,
    "online_pd": check_online_pd,
}
SHAPES = {  # full (one H200) and smoke (CPU, seconds)
    "vocab": (151552, 512),
    "hidden": (2048, 64),
    "triton_tokens": (2048, 8),
    "roofline_tokens": (8192, 16),
    "output_tokens": (16384, 64),
    "pd_seq": (4096, 32),
    "student_layers": (24, 2),
    "teacher_layers": (4, 2),
    "pd_steps": (4, 1),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON report goes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (logic only)")
    parser.add_argument("--only", help="comma-separated checks to run")
    parser.add_argument("--test-timeout", type=int, default=240)
    args = parser.parse_args(argv)
    args.shape = lambda name: SHAPES[name][1 if args.smoke else 0]
    from megatron_pd.platform import quiet_known_warnings

    quiet_known_warnings()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("error: no CUDA device; run with --smoke to check the logic on CPU", file=sys.stderr)
        return 2
    report = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checks": {},
    }
    wanted = args.only.split(",") if args.only else list(CHECKS)
    for name in wanted:
        start = time.perf_counter()
        try:
            result = CHECKS[name](args, device)
        except Exception as err:  # a report of what failed, not a stopped run
            result = {
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc()[-3000:],
            }
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["checks"][name] = result
        print(f"{name}: {json.dumps(result)[:400]}", flush=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.out)
    failed = [n for n, r in report["checks"].items() if "error" in r]
    print(f"report: {args.out}; failed checks: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
