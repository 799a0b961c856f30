"""The training loop: data per step, schedules, evaluation, checkpoints, metrics, stopping.

The loop is resumable to the bit on CPU: the data position is ``consumed_samples`` (restored
from the checkpoint), schedules are pure functions of the step, and model, optimizer and RNG
states come back from the checkpoint. SIGTERM/SIGUSR1 (SLURM pre-emption) make every rank save
a checkpoint at the end of the current step and exit cleanly.
"""

from __future__ import annotations

import math
import resource
import signal
import time

import torch
import torch.distributed as dist

from megatron_pd.data.datasets import GlobalBatchSampler, microbatches
from megatron_pd.engine.flops import peak_tflops, train_flops_per_token
from megatron_pd.engine.metrics import MetricsLogger, Stopwatch
from megatron_pd.engine.schedules import schedule_value
from megatron_pd.parallel.collectives import any_rank


def memory_gb(device: torch.device) -> dict:
    """Allocator peak on GPU; process peak RSS on CPU."""
    if device.type == "cuda":
        return {
            "mem_allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
            "mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        }
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mem_peak_rss_gb": peak_kb / 2**20}


class _StopRequest:
    """Remembers a pre-emption signal (SIGTERM, SIGUSR1, or Ctrl-C's SIGINT); every rank
    agrees on it at step boundaries, saves and exits."""

    def __init__(self):
        self.flag = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        self.flag = True

    def agreed(self, device) -> bool:
        return any_rank(self.flag, dist.group.WORLD, device)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainingStopped(ValueError):
    """The run cannot go on (non-finite steps in a row, too many loss spikes): one line."""


class Trainer:
    """Runs ``module`` (a TrainModule) over the train split for the configured steps."""

    def __init__(
        self,
        cfg,
        module,
        splits,
        sample_ids: dict,
        checkpoints,
        run_dir: str,
        dp_rank: int,
        tokenizer_fingerprint: str | None = None,
    ):
        self.cfg = cfg
        self.module = module
        self.splits = splits
        self.checkpoints = checkpoints
        self.run_dir = run_dir
        self.total_steps = cfg.total_steps()
        self.sampler = GlobalBatchSampler(
            cfg.train.global_batch_size,
            cfg.train.micro_batch_size,
            module.dp_size,
            dp_rank,
        )
        self.step = 0
        self.consumed_samples = 0
        self.skipped_in_a_row = 0  # steps skipped for non-finite values (train.max_skipped_steps)
        self.rollbacks = 0  # loss-spike rollbacks (train.spike_factor)
        self.loss_history: list = []
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.distill = cfg.distill.enabled
        self.sample_ids = sample_ids  # unshuffled ids per split (datasets.sample_ids_of)
        self.is_logging_rank = dist.get_rank() == 0
        flops = train_flops_per_token(cfg.model, module.vocab.padded_size, cfg.data.seq_length)
        self.flops_per_token = flops
        self.peak_tflops, self.peak_source = peak_tflops(module.device, module.params_dtype)

    # ------------------------------------------------------------------ state
    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "global_batch_size": self.cfg.train.global_batch_size,
            "seq_length": self.cfg.data.seq_length,
            "data_seed": self.cfg.data.seed,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "true_vocab": self.module.vocab.true_size,
        }

    def restore(self, state: dict) -> None:
        for key in ("seq_length", "data_seed"):
            expected = self.trainer_state()[key]
            if key in state and state[key] != expected:
                raise ValueError(
                    f"checkpoint was trained with {key}={state[key]}, this run has {expected}: "
                    "the sample order would not continue"
                )
        self.step = int(state.get("step", 0))
        self.consumed_samples = int(state.get("consumed_samples", 0))
        if self.module.recorder is not None:
            self.module.recorder.discard_after(self.step)

    # ------------------------------------------------------------------ loop
    def _batches(self, split: str, consumed_samples: int) -> list:
        """This rank's micro-batches of a split (with unshuffled sample ids and the split)."""
        dataset = getattr(self.splits, split)
        consumed_samples += self._offset(split)
        batches = microbatches(dataset, self.sampler, consumed_samples, self.sample_ids[split])
        return [dict(batch, split=split) for batch in batches]

    def _offset(self, split: str) -> int:
        """Samples skipped at the start of a split (distill.store_steps moves train's start)."""
        return self.module.train_sample_offset() if split == "train" else 0

    def _prefetch(self, split: str, consumed_samples: int) -> None:
        """Let an offline-distillation module start reading the next step's teacher entries."""
        prefetch = getattr(self.module, "prefetch", None)
        if prefetch is None or not self.cfg.distill.offline:
            return
        size = len(getattr(self.splits, split))
        consumed_samples += self._offset(split)
        indices = [i % size for m in self.sampler.microbatch_indices(consumed_samples) for i in m]
        prefetch(split, self.sample_ids[split].of(indices))

    def train_values(self, result, lr: float, seconds: float) -> dict:
        """What one train step logs (extended by the distillation trainer)."""
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_length
        world = dist.get_world_size()
        achieved = self.flops_per_token * tokens / seconds / 1e12 / world
        values = {
            "loss": result.loss,
            **result.extras,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens / seconds,
            "samples_per_s": self.cfg.train.global_batch_size / seconds,
            "step_time_s": seconds,
            "tflops_per_device": achieved,
            "mfu": achieved / self.peak_tflops if self.peak_tflops else None,
            "skipped": int(result.skipped),
            **memory_gb(self.module.device),
        }
        return values

    def schedules(self, step: int) -> dict:
        """Learning rate and (when distilling) alpha and tau at ``step``."""
        values = {"lr": schedule_value(self.cfg.lr_schedule, step, self.total_steps)}
        if self.distill:
            values["alpha"] = schedule_value(self.cfg.alpha_schedule(), step, self.total_steps)
            values["tau"] = schedule_value(self.cfg.distill.tau, step, self.total_steps)
        return values

    def teacher_check(self, logger: MetricsLogger) -> dict:
        """The teacher's own validation loss, once; a loud warning if it is at chance level."""
        import math

        gbs = self.cfg.train.global_batch_size
        batches = [self._batches("valid", i * gbs) for i in range(self.cfg.train.eval_batches)]
        totals = [self.module.teacher_eval(b) for b in batches]
        tokens = sum(t["tokens"] for t in totals)
        loss = sum(t["loss"] * t["tokens"] for t in totals) / max(tokens, 1)
        chance = math.log(self.module.vocab.true_size)
        logger.log_eval(self.step, "teacher_valid", {"loss": loss, "chance": chance})
        if loss >= chance - 0.1:
            logger.text(
                "\n" + "!" * 78 + f"\nWARNING: the teacher's validation loss {loss:.3f} "
                f"is no better than chance (ln V = {chance:.3f}).\nIs "
                f"distill.teacher.load={self.cfg.distill.teacher.load} a trained model?"
                "\n" + "!" * 78
            )
        return {"loss": loss, "chance": chance}

    def _metric_step(self, step: int) -> bool:
        """Whether train step ``step`` (1-based) computes the costly distillation metrics."""
        return step % self.cfg.logging.metrics_interval == 0 or step == self.total_steps

    def evaluate(self, logger: MetricsLogger) -> dict:
        self.module.metrics = True
        totals, tokens = {}, 0
        gbs = self.cfg.train.global_batch_size
        for index in range(self.cfg.train.eval_batches):
            result = self.module.eval_step(self._batches("valid", index * gbs))
            for name, value in {"loss": result.loss, **result.extras}.items():
                totals[name] = totals.get(name, 0.0) + value * result.tokens
            tokens += result.tokens
        values = {name: value / max(tokens, 1) for name, value in totals.items()}
        logger.log_eval(self.step, "valid", values)
        return values

    def fit(self) -> dict:
        """Train to the end (or to ``train.stop_after_steps``); returns the last values."""
        cfg = self.cfg
        if self.step >= self.total_steps:
            if self.is_logging_rank:
                print(f"nothing to do: the run is complete at step {self.step}", flush=True)
            self.checkpoints.close()
            return {}
        logger = MetricsLogger(
            self.run_dir,
            enabled=self.is_logging_rank,
            total_steps=self.total_steps,
            log_interval=cfg.logging.log_interval,
            tensorboard=cfg.logging.tensorboard,
            resume_step=self.step,
        )
        logger.text(
            f"training {self.total_steps} steps from step {self.step}: "
            f"{self.module.num_parameters():,} parameters, peak {self.peak_tflops or 0:.2f} "
            f"TFLOP/s per device ({self.peak_source})"
        )
        if self.distill and not cfg.distill.offline and cfg.train.eval_interval and self.step == 0:
            self.teacher_check(logger)  # once per run (a resumed run logged it already)
        stop = _StopRequest()
        last = {}
        interrupted = False
        try:
            while self.step < self.total_steps:
                batches = self._batches("train", self.consumed_samples)
                self._prefetch("train", self.consumed_samples + cfg.train.global_batch_size)
                scheduled = self.schedules(self.step)
                lr = scheduled.pop("lr")
                self.module.step = self.step
                self.module.metrics = self._metric_step(self.step + 1)
                with Stopwatch() as watch:
                    result = self.module.train_step(batches, lr, **scheduled)
                self.step += 1
                self.consumed_samples += cfg.train.global_batch_size
                last = self.train_values(result, lr, watch.seconds)
                logger.log_train(self.step, last, watch.seconds)
                self._check_finite(result, logger)
                if self._spike(result, logger):
                    continue
                self.checkpoints.poll()
                interval = cfg.train.eval_interval
                if interval and self.step % interval == 0 and self.step < self.total_steps:
                    self.evaluate(logger)
                save_every = cfg.checkpoint.save_interval
                if save_every and self.step % save_every == 0 and self.step < self.total_steps:
                    self.save(logger)
                if cfg.train.stop_after_steps and self.step >= cfg.train.stop_after_steps:
                    interrupted = True
                    logger.text(f"stopping after step {self.step} (train.stop_after_steps)")
                    break
                if stop.agreed(self.module.device):
                    interrupted = True
                    logger.text(f"pre-emption signal: saving at step {self.step} and exiting")
                    self.save(logger)
                    break
            if not interrupted:
                if cfg.train.eval_interval:
                    last.update({f"valid_{k}": v for k, v in self.evaluate(logger).items()})
                if cfg.checkpoint.final_save:
                    self.save(logger)
                if self.module.recorder is not None:
                    self.module.recorder.finish(self.step)
                    logger.text(f"recorded logits: {cfg.train.record_logits}")
        finally:
            self.checkpoints.close()
            stop.restore()
            logger.close()
        return last

    def _check_finite(self, result, logger: MetricsLogger) -> None:
        """Count steps skipped for non-finite values; too many in a row end the run."""
        if result.nonfinite is None:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        limit = self.cfg.train.max_skipped_steps
        logger.text(
            f"step {self.step} skipped: not finite: {result.nonfinite} (no update, its batch "
            f"dropped; {self.skipped_in_a_row} in a row, train.max_skipped_steps={limit})"
        )
        if self.skipped_in_a_row >= limit:
            raise TrainingStopped(
                f"{self.skipped_in_a_row} steps in a row were not finite (last: step "
                f"{self.step}, {result.nonfinite}): the run stops; its last checkpoint is "
                "intact (a lower learning rate, or bf16 instead of fp16, may help)"
            )

    def _spike(self, result, logger: MetricsLogger) -> bool:
        """Loss-spike policy (train.spike_factor): roll back to the last checkpoint, keep the
        data position (the batches since the checkpoint are skipped). True if it rolled back."""
        factor = self.cfg.train.spike_factor
        if factor is None or result.nonfinite is not None or not math.isfinite(result.loss):
            return False
        history = self.loss_history
        warm = len(history) >= max(self.cfg.train.spike_warmup_steps, 1)
        mean = sum(history) / len(history) if history else None
        if not (warm and result.loss > factor * mean):
            history.append(result.loss)
            del history[: -max(self.cfg.train.spike_warmup_steps, 1)]
            return False
        from megatron_pd.models.checkpoint import latest_checkpoint, load_checkpoint

        self.checkpoints.wait()
        path = latest_checkpoint(self.checkpoints.root)
        if path is None:
            logger.text(
                f"step {self.step}: loss {result.loss:.4f} > {factor} x running mean "
                f"{mean:.4f}, but there is no checkpoint to roll back to: going on"
            )
            return False
        self.rollbacks += 1
        if self.rollbacks > self.cfg.train.max_rollbacks:
            raise TrainingStopped(
                f"loss spike at step {self.step} ({result.loss:.4f} > {factor} x {mean:.4f}) "
                f"after {self.rollbacks - 1} rollbacks (train.max_rollbacks): the run stops"
            )
        spiked, position = self.step, self.consumed_samples
        state = load_checkpoint(self.module, path)
        self.step = int(state.get("step", 0))
        self.consumed_samples = position  # the batches since the checkpoint are skipped
        if self.module.recorder is not None:
            self.module.recorder.discard_after(self.step)
        logger.rewind(self.step)
        logger.event(
            self.step,
            {"rollback_from": spiked, "loss": result.loss, "running_mean": mean, "to": path},
        )
        logger.text(
            f"loss spike at step {spiked}: {result.loss:.4f} > {factor} x running mean "
            f"{mean:.4f}; rolled back to {path} (step {self.step}), skipping the "
            f"{(spiked - self.step) * self.cfg.train.global_batch_size} samples since "
            f"(rollback {self.rollbacks} of at most {self.cfg.train.max_rollbacks})"
        )
        return True

    def save(self, logger: MetricsLogger) -> None:
        if self.module.recorder is not None:  # recorded logits stay in step with checkpoints
            self.module.recorder.flush(self.step)
        start = time.perf_counter()
        path = self.checkpoints.save(self.module, self.step, self.trainer_state())
        kind = "scheduled (async)" if self.checkpoints.async_save else "saved"
        logger.text(f"checkpoint {kind}: {path} in {time.perf_counter() - start:.1f}s")
