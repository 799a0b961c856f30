"""The frozen teacher: a megatron-core GPTModel loaded read-only, with its own parallel layout.

Frozen by construction: every parameter has ``requires_grad=False``, the module is in eval
mode, it is never wrapped in DDP nor given to an optimizer, its forward runs under
``torch.no_grad()``, and it is not part of the student's checkpoint. Loading resolves a
megatron_pd run directory / checkpoint root / iter directory, takes the teacher's shape from
the run's config.yaml unless given, reshards any TP/PP checkpoint to the teacher's layout
(dist_checkpointing), and refuses a teacher whose weights did not all load: parameters are
filled with NaN first and checked after.

Shape legend: B batch, S sequence, v this rank's vocab shard of the teacher.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_pd.config.schema import ModelConfig
from megatron_pd.models.gpt import build_gpt_model, causal_attention_mask, seed_rngs
from megatron_pd.models.init import sharding_metadata
from megatron_pd.parallel.vocab import VocabInfo


def resolve_teacher_source(path: str) -> tuple:
    """(checkpoint iter directory, run config.yaml or None) for a user-given teacher path."""
    from megatron_pd.models.checkpoint import latest_checkpoint

    if not os.path.exists(path):
        raise ValueError(f"distill.teacher.load={path}: does not exist")
    if os.path.isfile(os.path.join(path, "config.yaml")):  # a run directory
        root = os.path.join(path, "checkpoints")
        checkpoint = latest_checkpoint(root) if os.path.isdir(root) else None
        if checkpoint is None:
            raise ValueError(
                f"distill.teacher.load={path}: run directory has no checkpoint under {root}"
            )
        return checkpoint, os.path.join(path, "config.yaml")
    if os.path.isfile(os.path.join(path, "latest")):  # a checkpoint root
        config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
        return latest_checkpoint(path), config if os.path.isfile(config) else None
    if os.path.isfile(os.path.join(path, "metadata.json")):  # one checkpoint directory
        config = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml"
        )
        return path, config if os.path.isfile(config) else None
    raise ValueError(
        f"distill.teacher.load={path}: not a megatron_pd run directory, "
        "checkpoint root or checkpoint"
    )


def teacher_model_config(teacher_cfg, run_config_path: str | None) -> ModelConfig:
    """The teacher's ModelConfig: given explicitly, or the teacher run's own."""
    if teacher_cfg.model is not None:
        return teacher_cfg.model
    if run_config_path is None:
        raise ValueError(
            "distill.teacher.model is not set and no config.yaml was found next to "
            f"the teacher checkpoint {teacher_cfg.load}"
        )
    from megatron_pd.config.loader import load_config

    return load_config(run_config_path).model


def checkpoint_padded_vocab(checkpoint_dir: str) -> int:
    """Rows of the word embedding stored in a checkpoint (the padded vocabulary)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(checkpoint_dir)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in metadata:
            return int(metadata[key].global_shape[0])
    raise ValueError(f"teacher checkpoint {checkpoint_dir} holds no word embedding")


def checkpoint_trainer_state(checkpoint_dir: str) -> dict:
    """The trainer state (step, tokenizer fingerprint, ...) a checkpoint recorded."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(checkpoint_dir)
    return common.get("trainer", {}) if isinstance(common, dict) else {}


class FrozenTeacher:
    """A read-only teacher on this rank's shard of its own layout (see module doc)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        vocab: VocabInfo,
        groups,
        dtype: torch.dtype,
        max_sequence_length: int,
        seed: int = 0,
    ):
        self.cfg = model_cfg
        self.vocab = vocab
        self.groups = groups
        self.dtype = dtype
        self.pp_size = dist.get_world_size(groups.pp)
        self.is_last_stage = dist.get_rank(groups.pp) == self.pp_size - 1
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        if not get_cuda_rng_tracker().is_initialized():  # a teacher alone (e.g. a logit dump)
            seed_rngs(seed, dist.get_rank(groups.tp))
        self.model = build_gpt_model(
            model_cfg, vocab, groups, dtype, seed=seed, max_sequence_length=max_sequence_length
        )
        self.model.requires_grad_(False)
        self.model.eval()
        self.device = next(self.model.parameters()).device

    def parameters(self):
        return self.model.parameters()

    @torch.no_grad()
    def load(self, checkpoint_dir: str) -> None:
        """Load weights from a (any-layout) megatron_pd checkpoint; ValueError if any weight
        is missing or mismatched."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.validation import StrictHandling
        from torch.distributed.checkpoint.api import CheckpointException

        for param in self.model.parameters():
            param.fill_(float("nan"))
        state = {"model": self.model.sharded_state_dict(metadata=sharding_metadata(self.model))}
        try:
            loaded = dist_checkpointing.load(
                state, checkpoint_dir, strict=StrictHandling.RAISE_UNEXPECTED
            )
            self.model.load_state_dict(loaded["model"], strict=True)
        except (Exception, CheckpointException) as err:  # several types, one of them a
            # BaseException (torch.distributed.checkpoint's), for shape and key mismatches
            raise ValueError(
                f"teacher checkpoint {checkpoint_dir} does not fit the teacher "
                f"model ({type(err).__name__}: {str(err)[:300]})"
            ) from None
        missing = [n for n, p in self.model.named_parameters() if torch.isnan(p).any()]
        if missing:
            raise ValueError(
                f"teacher checkpoint {checkpoint_dir} left weights unloaded: {missing[:5]}"
            )
        self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def logits(self, tokens_BS: torch.Tensor) -> torch.Tensor | None:
        """Teacher logits [B, S, v] on the teacher's last pipeline stage (None elsewhere).

        Collective over the teacher's tp (and pp) groups.
        """
        tokens_BS = tokens_BS.to(self.device)
        batch, seq = tokens_BS.shape
        positions = torch.arange(seq, device=self.device).expand(batch, seq)
        mask = causal_attention_mask(seq, self.device)
        if self.pp_size == 1:
            return self.model(tokens_BS, positions, mask)
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        out = {}

        def forward_step(data_iterator, model):
            tokens = next(data_iterator)
            logits = model(tokens, positions, mask)

            def keep(output):
                out["logits"] = output
                return output.sum() * 0.0, torch.tensor(1), {}

            return logits, keep

        schedule = get_forward_backward_func(pp_size=self.pp_size)
        schedule(
            forward_step_func=forward_step,
            data_iterator=iter([tokens_BS]),
            model=[self.model],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=True,
            pg_collection=self.groups,
            p2p_communicator=P2PCommunicator(self.groups.pp, self.model.config),
        )
        return out.get("logits")

    @torch.no_grad()
    def lm_loss(self, tokens_BS, labels_BS, loss_mask_BS) -> tuple | None:
        """(sum of token CE, tokens) of the teacher's own next-token loss (last stage)."""
        from megatron_pd.loss.objective import distillation_loss
        from megatron_pd.loss.spec import LossSpec

        logits = self.logits(tokens_BS)
        if logits is None:
            return None
        out = distillation_loss(
            logits.reshape(-1, logits.shape[-1]),
            labels_BS.reshape(-1).to(self.device),
            None,
            LossSpec(alpha=0.0),
            self.vocab,
            self.groups.tp,
        )
        mask = loss_mask_BS.reshape(-1).to(self.device).float()
        return (out["loss"] * mask).sum(), mask.sum()
