"""Online (co-located) distillation step: a frozen teacher beside the student on every rank.

DistillTrainModule extends the student's TrainModule. Per micro-batch, before the student's
forward/backward schedule runs (so that student pipeline stages never wait on a teacher
collective), every rank:

1. gathers its teacher replica's union of student micro-batches (parallel/exchange.py),
2. runs the teacher forward on it (teacher TP/PP, no_grad, eval),
3. truncates to top-p-k on the teacher's tensor-parallel group when configured,
4. sends each student loss rank its own samples' teacher distribution in the student's vocab
   layout (dense vocab slices, or sparse kept entries).

The student's loss for micro-batch m then reads payload m: (1 - alpha) * CE + alpha * KD with
the fused loss (loss/objective.py). When the exchange is dense and the student has no
pipeline stages, the teacher for micro-batch m runs just before the student's forward of m
instead, so only one micro-batch of dense teacher logits is held at a time.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from megatron_pd.engine.train_module import StepResult, TrainModule
from megatron_pd.logits.truncation import (
    TruncationSpec,
    truncate_hidden_vocab_parallel,
    truncate_vocab_parallel,
)
from megatron_pd.loss.fused_linear import HiddenTeacher
from megatron_pd.loss.spec import DenseTeacher, LossSpec, SparseTeacher
from megatron_pd.models.teacher import open_teacher
from megatron_pd.parallel import topology
from megatron_pd.parallel.exchange import (
    ExchangePlan,
    exchange_dense,
    exchange_hidden,
    exchange_sparse,
    exchange_weight_rows,
    gather_union_tokens,
)
from megatron_pd.parallel.topology import Layout


def _finite_teacher(payload) -> bool:
    """No NaN or +inf in what the teacher sent (-inf logits of masked columns are fine)."""
    if isinstance(payload, DenseTeacher):
        x = payload.logits
        return not (torch.isnan(x).any() or torch.isposinf(x).any())
    if isinstance(payload, HiddenTeacher):
        return bool(torch.isfinite(payload.hidden).all())
    return bool(torch.isfinite(payload.logprobs[payload.valid]).all())


class DistillTrainModule(TrainModule):
    """The student's step with a frozen teacher; see module doc."""

    def __init__(
        self,
        cfg,
        groups,
        true_vocab_size: int,
        dp_size: int,
        tokenizer_fingerprint: str | None = None,
        dataset_fingerprints: dict | None = None,
    ):
        super().__init__(cfg, groups, true_vocab_size, dp_size)
        distill = cfg.distill
        self.rank = dist.get_rank()
        self.stores = {}
        self._window, self._offset = None, 0  # distill.store_steps (see _init_store)
        self._retruncate = None  # a narrower distill.truncation than the store's
        self.teacher = self.plan = self.truncation = None
        if distill.offline:
            self._init_store(
                distill.store, true_vocab_size, tokenizer_fingerprint, dataset_fingerprints or {}
            )
        else:
            self._init_live(distill, true_vocab_size, tokenizer_fingerprint)
        truncated = distill.offline or distill.truncation is not None
        if truncated and not distill.tail and self.rank == 0:
            cut = distill.truncation or "the store's"
            print(
                f"note: the student learns from a {cut} cut of the teacher without the dropped "
                "mass (distill.tail=false): it is trained to give the tokens outside the kept "
                "set no probability, which raised the held-out LM loss at small scale "
                "(docs/findings.md); distill.tail=true keeps that mass as one category",
                flush=True,
            )
        self.just_in_time = (
            not distill.offline and distill.exchange_mode == "dense" and self.pp_size == 1
        )
        self.alpha, self.tau = 1.0, 1.0
        self._payloads: list = []
        self._bytes = {"bytes": 0}
        self._teacher_seconds = 0.0

    def _init_live(self, distill, true_vocab_size: int, tokenizer_fingerprint) -> None:
        """A frozen teacher in this job, with its own layout, and the exchange plan."""
        world = dist.get_world_size()
        cfg = self.cfg
        teacher_layout = Layout(world, distill.teacher.tp, distill.teacher.pp)
        self.teacher_groups = topology.new_model_groups(teacher_layout)
        self.teacher, source = open_teacher(
            distill.teacher,
            self.teacher_groups,
            true_vocab_size,
            tokenizer_fingerprint,
            cfg.data.seq_length,
            dist.get_rank(self.teacher_groups.tp),
        )
        self.teacher_checkpoint = source.checkpoint
        padded = self.teacher.vocab.padded_size
        self.plan = ExchangePlan(
            world,
            Layout(world, cfg.parallel.tp, cfg.parallel.pp),
            teacher_layout,
            true_vocab_size,
            self.vocab.padded_size,
            padded,
            distill.exchange_mode,
        )
        self.truncation = (
            TruncationSpec.parse(distill.truncation, distill.min_k, distill.k_cap)
            if distill.truncation
            else None
        )
        self.teacher_rows = None  # hidden exchange: the teacher's output rows, student layout
        if self.plan.mode == "hidden":
            output_rank = self.plan.is_teacher_output_rank(self.rank)
            self.teacher_rows = exchange_weight_rows(
                self.plan,
                self.rank,
                self.teacher.output_weight() if output_rank else None,
                self.teacher.cfg.hidden_size,
                self.teacher.dtype,
                self.device,
            )

    def _init_store(
        self,
        store_dir: str,
        true_vocab_size: int,
        tokenizer_fingerprint,
        dataset_fingerprints: dict,
    ) -> None:
        """Offline: teacher entries come from a logits store, checked before step 1."""
        from megatron_pd.logits.store import StoreReader

        for split in ("train", "valid"):
            path = os.path.join(store_dir, split)
            if not os.path.isdir(path):
                if split == "train":
                    raise ValueError(f"distill.store={store_dir} has no train split")
                continue  # validation then measures the LM loss only
            # the current and the prefetched next step of this rank (compact samples)
            per_rank = self.cfg.train.global_batch_size // max(self.dp_size, 1)
            reader = StoreReader(path, cache_samples=max(2 * per_rank, 16))
            expected = {
                "vocab_size": true_vocab_size,
                "dataset": {
                    "seq_length": self.cfg.data.seq_length,
                    "split_name": split,
                    "split": self.cfg.data.split,
                    "seed": self.cfg.data.seed,
                },
            }
            if tokenizer_fingerprint:
                expected["tokenizer_fingerprint"] = tokenizer_fingerprint
            if split in dataset_fingerprints:
                expected["dataset"]["fingerprint"] = dataset_fingerprints[split]
            reader.check(expected)
            self.stores[split] = reader
        if self.cfg.distill.truncation is not None:  # a narrower cut of the stored entries
            from megatron_pd.logits.truncation import TruncationSpec, derivable_from

            d, stored = self.cfg.distill, self.stores["train"].header.truncation
            wanted = TruncationSpec.parse(d.truncation, d.min_k, d.k_cap)
            have = TruncationSpec(
                stored["top_p"], stored["top_k"], stored["min_k"], int(stored["slots"])
            )
            reason = derivable_from(wanted, have)
            if reason is not None:
                raise ValueError(
                    f"distill.truncation={wanted.name} (min_k {wanted.min_k}) cannot be cut "
                    f"from the store's {stored['name']} entries: {reason}"
                )
            key = ("top_p", "top_k", "min_k", "slots")
            if [getattr(wanted, k) for k in key] != [getattr(have, k) for k in key]:
                self._retruncate = wanted
        window = self.cfg.distill.store_steps
        if window is not None:
            header = self.stores["train"].header
            recorded_gbs = header.teacher.get("global_batch_size")
            if header.source != "pretraining" or not recorded_gbs:
                raise ValueError(
                    f"distill.store_steps={window}: {store_dir}/train was not recorded during "
                    f"a pre-training run (source {header.source!r}); it has no training steps"
                )
            self._window = (int(window[0]), int(window[1]))
            self._offset = (self._window[0] - 1) * int(recorded_gbs)

    def train_sample_offset(self) -> int:
        """With ``distill.store_steps``: the first sample the teacher trained on at step first."""
        return self._offset

    def check_store_coverage(self, sample_ids: dict) -> None:
        """Before step 1: the store holds every sample this run will read (a dump covers the
        samples of the run it was made for; one for fewer steps must be extended)."""
        import numpy as np

        gbs = self.cfg.train.global_batch_size
        reads = {
            "train": (self._offset, self.cfg.total_steps() * gbs),
            "valid": (0, self.cfg.train.eval_batches * gbs if self.cfg.train.eval_interval else 0),
        }
        for split, reader in self.stores.items():
            ids = sample_ids.get(split)
            first, count = reads[split]
            if ids is None or count == 0 or reader.header.source != "dump":
                continue  # a recorded store checks its step window per batch
            positions = (first + np.arange(count, dtype=np.int64)) % max(ids.total, 1)
            wanted = np.unique(ids.of(positions))
            held = np.asarray(reader.sample_ids(), dtype=np.int64)
            missing = np.setdiff1d(wanted, held)
            if missing.size:
                raise ValueError(
                    f"logits store {reader.split_dir} holds {held.size:,} samples, but this run "
                    f"reads {wanted.size:,} of the {split} split ({missing.size:,} missing, "
                    f"e.g. sample {int(missing[0])}): extend the store by rerunning "
                    "tools/dump_teacher_logits.py with this run's config (only the missing "
                    "samples are dumped)"
                )

    # ------------------------------------------------------------------ the teacher side
    def loss_spec(self) -> LossSpec:
        d = self.cfg.distill
        return LossSpec(
            kind=d.loss,
            alpha=self.alpha,
            tau=self.tau,
            tau_on_student=d.tau_on_student,
            tau_squared=d.tau_squared,
            jsd_beta=d.jsd_beta,
            tail=d.tail,
        )

    def teacher_payload(self, batch: dict):
        """The teacher's distribution for this rank's micro-batch (loss ranks; else None).

        Live teacher: collective over the whole world, in the same order on every rank.
        Store: every loss rank reads its samples itself (no communication).
        """
        start = time.perf_counter()
        if self.stores:
            payload = self._store_payload(batch)
            self._teacher_seconds += time.perf_counter() - start
            return payload
        try:
            payload = self._live_payload(batch)
        except ValueError as err:  # e.g. NaN teacher logits met by the truncation
            raise ValueError(f"{self._where(batch)}: {err}") from None
        if payload is not None and not _finite_teacher(payload):
            raise ValueError(
                f"{self._where(batch)}: the teacher's outputs are not finite (NaN or +inf): "
                "the student is never trained on them"
            )
        self._teacher_seconds += time.perf_counter() - start
        return payload

    def _where(self, batch: dict) -> str:
        ids = batch.get("sample_ids")
        shown = ids.tolist()[:8] if ids is not None else "?"
        return (
            f"train step {self.step + 1}, rank {self.rank}, samples {shown} "
            f"({batch.get('split', 'train')} split)"
        )

    def _live_payload(self, batch: dict):
        tokens = batch["tokens"]
        size, seq = tokens.shape
        union = gather_union_tokens(
            tokens.to(self.device), self.plan, self.rank, self.teacher_groups.mp
        )
        output_rank = self.plan.is_teacher_output_rank(self.rank)
        if self.plan.mode == "sparse":
            payload = self._sparse_payload(union, size, seq, output_rank)
        elif self.plan.mode == "hidden":
            hidden = self.teacher.hidden(union)
            width = self.teacher.cfg.hidden_size
            received = exchange_hidden(
                self.plan,
                self.rank,
                hidden,
                size,
                seq,
                width,
                self.teacher.dtype,
                self.device,
                self._bytes,
            )
            payload = None
            if received is not None:
                payload = HiddenTeacher(received.reshape(-1, width), self.teacher_rows)
                if self.truncation is not None:  # top-p-k in the student's vocab layout
                    payload = truncate_hidden_vocab_parallel(
                        payload.hidden, payload.weight, self.vocab, self.truncation, self.groups.tp
                    )
        else:
            logits = self.teacher.logits(union)
            dense = exchange_dense(
                self.plan,
                self.rank,
                logits if output_rank else None,
                size,
                seq,
                self.teacher.dtype,
                self.device,
                self._bytes,
            )
            payload = None
            if dense is not None:
                flat = dense.reshape(-1, dense.shape[-1])
                if self.truncation is not None:  # truncate in the student's vocab layout
                    payload = truncate_vocab_parallel(
                        flat, self.vocab, self.truncation, self.groups.tp
                    )
                else:
                    payload = DenseTeacher(flat)
        return payload

    def _sparse_payload(self, union, size: int, seq: int, output_rank: bool):
        """Top-p-k on the teacher's tp group (from its hidden states chunk by chunk when the
        output layer is fused), then each loss rank's kept entries."""
        ids = logp = log_tail = None
        if self.fused_output:
            kept = self.teacher.kept_entries(union, self.truncation)
        else:
            logits = self.teacher.logits(union)
            kept = None
            if output_rank:
                flat = logits.reshape(-1, logits.shape[-1])
                kept = truncate_vocab_parallel(
                    flat, self.teacher.vocab, self.truncation, self.teacher_groups.tp
                )
        if output_rank:
            ids = kept.indices.reshape(union.shape[0], seq, -1)
            logp = kept.logprobs.reshape(union.shape[0], seq, -1)
            log_tail = kept.log_tail.reshape(union.shape[0], seq)
        received = exchange_sparse(
            self.plan,
            self.rank,
            ids,
            logp,
            size,
            seq,
            self.truncation.slots,
            self.device,
            self._bytes,
            log_tail=log_tail,
        )
        if received is None:
            return None
        return SparseTeacher(
            received[0].reshape(-1, self.truncation.slots).long(),
            received[1].reshape(-1, self.truncation.slots),
            received[2].reshape(-1),
        )

    def _store_payload(self, batch: dict):
        if not self.is_last_stage:
            return None
        reader = self.stores.get(batch.get("split", "train"))
        if reader is None:
            return None
        sample_ids = batch["sample_ids"].tolist()
        if self._window is not None and reader is self.stores.get("train"):
            first, last = self._window
            for sample in sample_ids:
                step = reader.step_of(sample)
                if step is None or not first <= step <= last:
                    when = "never recorded" if step is None else f"recorded at teacher step {step}"
                    raise ValueError(
                        f"sample {sample} of the train split was {when}, outside "
                        f"distill.store_steps=[{first}, {last}]: this run reads past the "
                        "window (fewer train steps, or a wider window)"
                    )
        ids, logp, log_tail = reader.get_many(sample_ids)
        slots = ids.shape[-1]
        teacher = SparseTeacher(
            torch.from_numpy(ids).view(-1, slots).to(self.device, torch.long),
            torch.from_numpy(logp).view(-1, slots).to(self.device),
            None if log_tail is None else torch.from_numpy(log_tail).view(-1).to(self.device),
        )
        if self._retruncate is not None:
            from megatron_pd.logits.truncation import retruncate

            teacher = retruncate(teacher, self._retruncate)
        return teacher

    def prefetch(self, split: str, sample_ids) -> None:
        """Start decoding the next step's samples (offline distillation)."""
        if split in self.stores and self.is_last_stage:
            self.stores[split].prefetch(sample_ids)

    # ------------------------------------------------------------------ the student side
    def loss_terms(self, student, batch: dict, mask_N) -> tuple:
        teacher = batch.get("teacher")
        if teacher is None:
            teacher = self._payloads[batch["microbatch"]]
        spec = self.loss_spec()
        if teacher is None:  # a store without this split (e.g. recorded: no valid split)
            from dataclasses import replace

            spec = replace(spec, alpha=0.0)
        loss_sum, out = self.student_loss(
            student, batch["labels"].reshape(-1), teacher, spec, mask_N
        )
        terms = {
            "loss": out["loss"],
            "lm_loss": out["lm"],
            "kd_loss": out["kd"],
            "teacher_entropy": out["teacher_entropy"],
            "top1_agreement": out["agree"],
        }
        if isinstance(teacher, SparseTeacher):
            terms["kept_per_token"] = out["kept"]
        return loss_sum, terms

    def _forward_step(self, data_iterator, model):
        if self.just_in_time:  # every rank reaches micro-batch m here in the same order
            batch = next(data_iterator)
            batch = dict(batch, teacher=self.teacher_payload(batch))
            return super()._forward_step(iter([batch]), model)
        return super()._forward_step(data_iterator, model)

    def _prepare_teacher(self, microbatches: list) -> None:
        """Teacher payloads of every micro-batch, in schedule order (unless just in time)."""
        self._payloads = (
            [] if self.just_in_time else [self.teacher_payload(b) for b in microbatches]
        )

    def _finish(self, result: StepResult, seconds: float, tokens: int) -> StepResult:
        moved = torch.tensor([float(self._bytes["bytes"])], dtype=torch.float64, device=self.device)
        dist.all_reduce(moved)
        result.extras["alpha"] = self.alpha
        result.extras["tau"] = self.tau
        result.extras["teacher_time_share"] = self._teacher_seconds / max(seconds, 1e-9)
        result.extras["exchange_bytes_per_token"] = moved.item() / max(tokens, 1)
        self._bytes["bytes"], self._teacher_seconds = 0, 0.0
        return result

    def train_step(
        self, microbatches: list, lr: float, alpha: float = 1.0, tau: float = 1.0
    ) -> StepResult:
        self.alpha, self.tau = alpha, tau
        start = time.perf_counter()
        self._prepare_teacher(microbatches)
        result = super().train_step(microbatches, lr)
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_length
        return self._finish(result, time.perf_counter() - start, tokens)

    @torch.no_grad()
    def eval_step(self, microbatches: list) -> StepResult:
        start = time.perf_counter()
        self._prepare_teacher(microbatches)
        result = super().eval_step(microbatches)
        tokens = sum(b["tokens"].numel() for b in microbatches) * self.dp_size
        return self._finish(result, time.perf_counter() - start, tokens)

    @torch.no_grad()
    def teacher_eval(self, microbatches: list) -> dict:
        """The teacher's own next-token loss on this rank's micro-batches, made global."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in microbatches:
            union = gather_union_tokens(
                batch["tokens"].to(self.device), self.plan, self.rank, self.teacher_groups.mp
            )
            labels = gather_union_tokens(
                batch["labels"].to(self.device), self.plan, self.rank, self.teacher_groups.mp
            )
            mask = gather_union_tokens(
                batch["loss_mask"].to(self.device), self.plan, self.rank, self.teacher_groups.mp
            )
            out = self.teacher.lm_loss(union, labels, mask)
            counted = out is not None and dist.get_rank(self.teacher_groups.tp) == 0
            if counted:
                totals += torch.stack([out[0].double(), out[1].double()])
        dist.all_reduce(totals)
        return {"loss": (totals[0] / totals[1].clamp_min(1)).item(), "tokens": totals[1].item()}
