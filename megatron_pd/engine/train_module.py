"""The student's training step: model + megatron DDP + optimizer + forward/backward schedule.

A TrainModule owns everything that one optimizer step touches; the Trainer (trainer.py) owns
the loop (data, schedules, evaluation, checkpoints, logging). The step runs megatron-core's
forward/backward function (1F1B when pp > 1) over this rank's micro-batches; losses are
returned as (sum over tokens, token count) so gradients and reported losses are exact token
means over the whole global batch, whatever the micro-batching, masking and DP size.

Shape legend: B micro-batch, S sequence, N = B*S tokens, v this rank's vocab shard.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_pd.config.schema import Config
from megatron_pd.loss.fused_linear import HiddenTeacher, fused_linear_distillation_loss
from megatron_pd.loss.objective import distillation_loss, resolve_implementation
from megatron_pd.loss.spec import DenseTeacher, LossSpec
from megatron_pd.models.gpt import (
    build_gpt_model,
    causal_attention_mask,
    hidden_output,
    output_weight,
    seed_rngs,
)
from megatron_pd.parallel.collectives import any_rank, gather_dim0
from megatron_pd.parallel.vocab import VocabInfo, model_padded_vocab
from megatron_pd.platform.faults import fault

_LM_ONLY = LossSpec(alpha=0.0)  # plain next-token cross-entropy over the true vocabulary
# per-token values that cost extra passes over the vocabulary: computed on metric steps only
METRIC_TERMS = ("teacher_entropy", "top1_agreement")


@dataclass
class StudentOutput:
    """What the student's last stage made of one micro-batch: logits [N, v] (the logits
    path), or hidden states [N, H] with this rank's output-weight shard [v, H] (the fused
    output layer). Tokens in batch-major order, like the labels."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    sequence_parallel: bool = False  # ``hidden`` came out of a sequence-parallel gather


def resolve_precision(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass
class StepResult:
    """Global (all-rank) results of one step; identical on every rank."""

    loss: float
    tokens: int
    grad_norm: float | None
    skipped: bool
    extras: dict
    nonfinite: str | None = None  # what was not finite when the step was skipped for it


class TrainModule:
    """Builds the student on this rank and runs training/evaluation steps."""

    def __init__(self, cfg: Config, groups, true_vocab_size: int, dp_size: int):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import (
            OptimizerConfig,
            get_megatron_optimizer,
            get_standard_config_overrides,
        )

        self.cfg = cfg
        self.groups = groups
        self.loss_impl = resolve_implementation(cfg.loss.implementation)
        self.dp_size = dp_size
        self.tp_size = dist.get_world_size(groups.tp)
        self.pp_size = dist.get_world_size(groups.pp)
        self.pp_rank = dist.get_rank(groups.pp)
        self.is_last_stage = self.pp_rank == self.pp_size - 1
        self.params_dtype = resolve_precision(cfg.train.precision)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.vocab = VocabInfo(
            true_size=true_vocab_size,
            padded_size=model_padded_vocab(cfg.model, true_vocab_size, self.tp_size),
            tp_size=self.tp_size,
            tp_rank=dist.get_rank(groups.tp),
        )
        seed_rngs(cfg.train.seed, self.vocab.tp_rank)
        max_positions = cfg.model.max_position_embeddings or cfg.data.seq_length
        gpt = build_gpt_model(
            cfg.model,
            self.vocab,
            groups,
            self.params_dtype,
            seed=cfg.train.seed,
            max_sequence_length=max_positions,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )
        self.model_config = gpt.config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        self.model = DistributedDataParallel(
            self.model_config, ddp_config, gpt, pg_collection=groups
        )
        opt = cfg.optimizer
        optimizer_config = OptimizerConfig(
            optimizer="sgd" if opt.name == "sgd" else "adam",
            lr=cfg.lr_schedule.value,
            min_lr=cfg.lr_schedule.final,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            decoupled_weight_decay=opt.name != "adam",
            bf16=self.params_dtype == torch.bfloat16,
            fp16=self.params_dtype == torch.float16,
            params_dtype=self.params_dtype,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            initial_loss_scale=2.0**16 if self.params_dtype == torch.float16 else None,
        )
        self.optimizer = get_megatron_optimizer(
            optimizer_config,
            [self.model],
            config_overrides=get_standard_config_overrides(optimizer_config),
        )
        self.model_config.finalize_model_grads_func = functools.partial(
            finalize_model_grads, pg_collection=groups
        )
        self.model_config.grad_scale_func = self.optimizer.scale_loss
        self.model_config.no_sync_func = self.model.no_sync
        self._attention_mask = causal_attention_mask(cfg.data.seq_length, self.device)
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self._forward_backward = get_forward_backward_func(pp_size=self.pp_size)
        self._report_names = {}  # per mode (train, eval): what the last stage reports
        self.fused_output = cfg.loss.fused_output_layer
        # the gradient megatron's schedule sends into each micro-batch's loss sum (per-token
        # losses: just the loss scale); the fused output layer adds dL/dW into main_grad with it
        self._grad_scale = 1.0
        self.metrics = True  # the trainer turns the costly metrics on for some steps only
        self.capture: list | None = None
        self.recorder = None  # see enable_recording
        self.step = 0  # the trainer's current step (recorded with logits)

    # ----------------------------------------------------------------- the loss
    def student_output(self, output_BSx: torch.Tensor) -> StudentOutput:
        """The model's last-stage output as logits or (fused) hidden states + weight."""
        if not self.fused_output:
            return StudentOutput(logits=output_BSx.reshape(-1, output_BSx.shape[-1]))
        sequence_parallel = self.cfg.parallel.sequence_parallel
        hidden = output_BSx
        if sequence_parallel:  # [B, S/tp, H] shard -> [B, S, H]; backward reduce-scatters
            hidden = gather_dim0(hidden.transpose(0, 1), self.groups.tp).transpose(0, 1)
        return StudentOutput(
            hidden=hidden.reshape(-1, hidden.shape[-1]),
            weight=output_weight(self.model),
            sequence_parallel=sequence_parallel,
        )

    def student_loss(self, student: StudentOutput, labels_N, teacher, spec, mask_N) -> tuple:
        """(differentiable sum_t mask_t loss_t, per-token values (detached)) of either path.

        Collective over the student's tp group.
        """
        common = dict(impl=self.loss_impl, metrics=self.metrics)
        if student.logits is not None:
            if isinstance(teacher, HiddenTeacher):  # the logits path makes its logits whole
                teacher = DenseTeacher(teacher.logits(0, teacher.hidden.shape[0]))
            out = distillation_loss(
                student.logits,
                labels_N,
                teacher,
                spec,
                self.vocab,
                self.groups.tp,
                chunk_tokens=self.cfg.loss.chunk_tokens,
                check_inputs=self.cfg.loss.check_inputs,
                **common,
            )
            return (out["loss"] * mask_N).sum(), {k: v.detach() for k, v in out.items()}
        out = fused_linear_distillation_loss(
            student.hidden,
            student.weight,
            labels_N,
            mask_N,
            teacher,
            spec,
            self.vocab,
            self.groups.tp,
            sequence_parallel=student.sequence_parallel,
            check_inputs=self.cfg.loss.check_inputs,
            chunk_tokens=self.cfg.loss.chunk_tokens,
            grad_scale=self._grad_scale,
            **common,
        )
        return out.pop("weighted"), out

    def loss_terms(self, student: StudentOutput, batch: dict, mask_N) -> tuple:
        """(differentiable masked loss sum, per-token terms) of one micro-batch.

        The LM module has one term; the distillation module overrides this.
        """
        loss_sum, out = self.student_loss(
            student, batch["labels"].reshape(-1), None, _LM_ONLY, mask_N
        )
        return loss_sum, {"loss": out["loss"], "lm_loss": out["lm"]}

    def train_sample_offset(self) -> int:
        """Where this run's training data starts (in samples of the train split)."""
        return 0

    def enable_recording(self, store_dir: str, dataset_ids, tokenizer_fingerprint: str) -> None:
        """Record this run's truncated training logits into a store (see logits/record.py)."""
        from dataclasses import asdict

        from megatron_pd.logits import store_format as F
        from megatron_pd.logits.record import LogitRecorder
        from megatron_pd.logits.store_format import dataset_header, truncation_header
        from megatron_pd.logits.truncation import TruncationSpec

        spec = TruncationSpec.parse(self.cfg.train.record_truncation)
        header = F.StoreHeader(
            vocab_size=self.vocab.true_size,
            tokenizer_fingerprint=tokenizer_fingerprint,
            dataset=dataset_header(dataset_ids, "train", self.cfg.data),
            teacher={
                "run_dir": self.cfg.run_dir,
                "model": asdict(self.cfg.model),
                "global_batch_size": self.cfg.train.global_batch_size,
                # the sample count its train split was built for (fixes megatron's shuffle)
                "train_samples": self.cfg.total_steps() * self.cfg.train.global_batch_size,
            },
            truncation=truncation_header(spec),
            source="pretraining",
        )
        self.recorder = LogitRecorder(
            store_dir,
            spec,
            header,
            self.vocab,
            self.groups.tp,
            self.is_last_stage,
            dist.get_rank(self.groups.dp),
        )

    def _loss_func(self, batch: dict, output_BSx: torch.Tensor):
        student = self.student_output(output_BSx)
        if self.recorder is not None and self.model.training:
            self.recorder.record(student, batch["sample_ids"], self.step + 1)
        mask_N = batch["loss_mask"].reshape(-1).float()
        loss_sum, terms = self.loss_terms(student, batch, mask_N)
        if self.model.training and fault("nan_loss", self.step + 1):
            loss_sum = loss_sum + float("nan")  # the value, not its gradient
            terms = dict(
                terms, loss=terms["loss"] + float("nan"), lm_loss=terms["lm_loss"] * float("nan")
            )
        if self.model.training and fault("spike_loss", self.step + 1):
            terms = dict(terms, loss=terms["loss"] * 1000.0)  # reported only
        if self.capture is not None:  # per-token values, for tests and debugging
            self.capture.append({"microbatch": batch.get("microbatch"), **terms})
        report = {name: (value * mask_N).sum() for name, value in terms.items()}
        report["tokens"] = mask_N.sum()
        if any(name in terms for name in METRIC_TERMS):
            report["metric_tokens"] = report["tokens"] * float(self.metrics)
        num_tokens = mask_N.sum().to(torch.int)
        return loss_sum, num_tokens, report

    def _to_device(self, batch: dict) -> dict:
        if self.device.type == "cpu":
            return batch
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def _forward_step(self, data_iterator, model):
        batch = self._to_device(next(data_iterator))
        with hidden_output(model, self.fused_output):  # last stage: hidden states, no logits
            output = model(batch["tokens"], batch["position_ids"], self._attention_mask)
        return output, functools.partial(self._loss_func, batch)

    # ----------------------------------------------------------------- steps
    def _run_schedule(self, microbatches: list, forward_only: bool) -> list:
        indexed = [dict(batch, microbatch=i) for i, batch in enumerate(microbatches)]
        return self._forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iter(indexed),
            model=[self.model],
            num_microbatches=len(microbatches),
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def _reduce_reports(self, reports: list, mode: str) -> dict:
        """Sum the micro-batch reports of the last stage over DP and make them global."""
        if mode not in self._report_names:  # evaluation may report less (no store split)
            names = sorted(reports[0]) if reports else []
            self._report_names[mode] = _broadcast_names(names, self.groups.pp, self.pp_size)
        names = self._report_names[mode]
        if reports:
            totals = (
                torch.stack([torch.stack([r[n].float() for n in names]) for r in reports])
                .sum(0)
                .double()
            )
        else:
            totals = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        totals = totals.to(self.device)
        if self.is_last_stage:
            dist.all_reduce(totals, group=self.groups.dp)
        else:
            totals.zero_()
        if self.pp_size > 1:
            dist.all_reduce(totals, group=self.groups.pp)
        return dict(zip(names, totals.tolist()))

    def train_step(self, microbatches: list, lr: float) -> StepResult:
        """One optimizer step over this rank's micro-batches at learning rate ``lr``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.cfg.optimizer.weight_decay * group.get("wd_mult", 1.0)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        one = torch.ones(1, device=self.device)
        self._grad_scale = float(self.model_config.grad_scale_func(one))
        reports = self._run_schedule(microbatches, forward_only=False)
        fault("forward_backward", self.step + 1)
        if fault("nan_grad", self.step + 1):
            self.model.buffers[0].grad_data[0] = float("nan")
        totals = self._reduce_reports(reports, "train")
        problem = self._nonfinite(totals, reports)
        if problem is not None:  # never trained on: no update, the optimizer state untouched
            result = _result(totals, None, skipped=True)
            result.nonfinite = problem
            return result
        updated, grad_norm, _ = self.optimizer.step()
        return _result(totals, grad_norm, skipped=not updated)

    def _nonfinite(self, totals: dict, reports: list) -> str | None:
        """What is not finite in this step - "kd loss on rank 1, gradients on rank 0" - or
        None. Every rank gets the same answer (one MAX all-reduce of a flag; the ranks are
        gathered only when something is wrong)."""
        terms = [n for n in ("lm_loss", "kd_loss", "loss") if n in totals]
        bad_terms = [n for n in terms if not math.isfinite(totals[n])]
        local_grads = any(
            not torch.isfinite(buffer.grad_data).all()
            for buffer in self.model.buffers + self.model.expert_parallel_buffers
        )
        if not any_rank(bool(bad_terms or local_grads), dist.group.WORLD, self.device):
            return None
        local_terms = [
            n for n in terms if any(not math.isfinite(float(r[n])) for r in reports if n in r)
        ]
        local = {"terms": local_terms, "grads": local_grads}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
        parts = []
        for name in ("lm_loss", "kd_loss"):
            ranks = [r for r, info in enumerate(everyone) if name in info["terms"]]
            if ranks or name in bad_terms:
                parts.append(f"{name.replace('_loss', '')} loss on rank(s) {ranks or '?'}")
        ranks = [r for r, info in enumerate(everyone) if info["grads"]]
        if ranks:
            parts.append(f"gradients on rank(s) {ranks}")
        return ", ".join(parts) or "the loss"

    @torch.no_grad()
    def eval_step(self, microbatches: list) -> StepResult:
        """Forward-only pass; losses are token means over the global batch."""
        self.model.eval()
        reports = self._run_schedule(microbatches, forward_only=True)
        self.model.train()
        return _result(self._reduce_reports(reports, "eval"), None, skipped=False)

    def num_parameters(self) -> int:
        """Parameters of the whole model, each once: TP shards and PP stages summed; a
        parameter replicated over TP (norms, a row-parallel bias) counted on TP rank 0 only;
        the last stage's copy of tied embeddings not at all."""
        tp_rank = dist.get_rank(self.groups.tp)
        local = sum(
            p.numel()
            for p in self.model.parameters()
            if (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
            and not getattr(p, "shared", False)
        )
        total = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=self.groups.mp)
        return int(total.item())


def _broadcast_names(names: list, pp_group, pp_size: int) -> list:
    """The report names known on the last stage, on every stage of the pipeline."""
    if pp_size == 1:
        return names
    objects = [None] * pp_size
    dist.all_gather_object(objects, names, group=pp_group)
    return objects[-1]


def _result(totals: dict, grad_norm, skipped: bool) -> StepResult:
    tokens = totals.get("tokens", 0.0)
    metric_tokens = totals.pop("metric_tokens", tokens)
    means = {k: v / max(tokens, 1.0) for k, v in totals.items() if k != "tokens"}
    for name in METRIC_TERMS:  # computed on metric steps only: absent on the others
        if name in means:
            means[name] = totals[name] / metric_tokens if metric_tokens else None
            if means[name] is None:
                del means[name]
    loss = means.pop("loss", float("nan"))
    return StepResult(
        loss=loss,
        tokens=int(tokens),
        grad_norm=None if grad_norm is None else float(grad_norm),
        skipped=skipped,
        extras=means,
    )
