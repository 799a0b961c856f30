"""The frozen teacher: a megatron-core GPTModel loaded read-only, with its own parallel layout.

Frozen by construction: every parameter has ``requires_grad=False``, the module is in eval
mode, it is never wrapped in DDP nor given to an optimizer, its forward runs under
``torch.no_grad()``, and it is not part of the student's checkpoint. ``TeacherSource``
resolves a megatron_pd run directory / checkpoint root / iter directory (shape from the run's
config.yaml unless given; any TP/PP checkpoint resharded to the teacher's layout by
dist_checkpointing) or a Hugging Face model directory (shape from config.json; each rank reads
only its own slices of the safetensors, models/hf_weights.py). A teacher whose weights did not
all load is refused: parameters are filled with NaN first and checked after.

Shape legend: B batch, S sequence, v this rank's vocab shard of the teacher.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_pd.config.schema import ModelConfig
from megatron_pd.models.gpt import (
    build_gpt_model,
    causal_attention_mask,
    hidden_output,
    output_weight,
    seed_rngs,
)
from megatron_pd.models.init import sharding_metadata
from megatron_pd.parallel.vocab import VocabInfo


class TeacherSource:
    """Where a teacher's weights come from: a megatron_pd checkpoint or an HF model directory.

    ``path`` is what the user gave: a megatron_pd run directory, a checkpoint root (with a
    "latest" file), one iter_NNNNNNN directory, or a Hugging Face model directory (config.json
    and safetensors; loaded directly, no conversion step).
    """

    def __init__(self, path: str):
        from megatron_pd.platform import safe_loading

        safe_loading.install()  # its checkpoint metadata is unpickled under an allow-list
        from megatron_pd.models.checkpoint import latest_checkpoint
        from megatron_pd.models.hf_config import is_hf_model_dir

        self.path, self.run_config, self.kind = path, None, "megatron"
        if not os.path.exists(path):
            raise ValueError(f"distill.teacher.load={path}: does not exist")
        if os.path.isfile(os.path.join(path, "config.yaml")):  # a run directory
            root = os.path.join(path, "checkpoints")
            checkpoint = latest_checkpoint(root) if os.path.isdir(root) else None
            if checkpoint is None:
                raise ValueError(
                    f"distill.teacher.load={path}: run directory has no checkpoint under {root}"
                )
            self.checkpoint, self.run_config = checkpoint, os.path.join(path, "config.yaml")
        elif os.path.isfile(os.path.join(path, "latest")):  # a checkpoint root
            config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
            self.checkpoint = latest_checkpoint(path)
            self.run_config = config if os.path.isfile(config) else None
        elif os.path.isfile(os.path.join(path, "metadata.json")):  # one checkpoint directory
            config = os.path.join(
                os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml"
            )
            self.checkpoint = path
            self.run_config = config if os.path.isfile(config) else None
        elif is_hf_model_dir(path):
            self.kind, self.checkpoint = "hf", path
        else:
            raise ValueError(
                f"distill.teacher.load={path}: not a megatron_pd run directory, checkpoint "
                "root, checkpoint, or Hugging Face model directory (config.json + safetensors)"
            )
        self._hf = None

    def _hf_parts(self, model_cfg=None):
        from megatron_pd.models.hf_config import family_of, read_hf_config
        from megatron_pd.models.hf_weights import HFLayout, SafetensorsIndex

        config = read_hf_config(self.path)
        family = family_of(config, os.path.join(self.path, "config.json"))
        layout = HFLayout(model_cfg, family, int(config["vocab_size"])) if model_cfg else None
        return config, family, layout, SafetensorsIndex(self.path)

    def model_config(self, teacher_cfg, true_vocab: int, seq_length: int) -> ModelConfig:
        """The teacher's ModelConfig: its config.json (HF), given explicitly, or its run's."""
        if self.kind == "hf":
            from megatron_pd.models.hf_config import model_config_from_hf, read_hf_config

            if teacher_cfg.model is not None:
                raise ValueError(
                    f"distill.teacher.model is set, but the teacher {self.path} is a Hugging "
                    "Face model: its shape comes from its config.json (unset the field)"
                )
            model, _ = model_config_from_hf(
                read_hf_config(self.path),
                os.path.join(self.path, "config.json"),
                seq_length=seq_length,
                vocab_size=true_vocab,
            )
            return model
        if teacher_cfg.model is not None:
            return teacher_cfg.model
        if self.run_config is None:
            raise ValueError(
                "distill.teacher.model is not set and no config.yaml was found next to "
                f"the teacher checkpoint {teacher_cfg.load}"
            )
        from megatron_pd.config.loader import load_config

        return load_config(self.run_config).model

    def trained_length(self) -> tuple:
        """(tokens, where it is written) of the longest sequence this teacher knows, or
        (None, None): an HF config.json's max_position_embeddings, or the data.seq_length
        of the run that trained it."""
        if self.kind == "hf":
            from megatron_pd.models.hf_config import read_hf_config

            value = read_hf_config(self.path).get("max_position_embeddings")
            where = f"max_position_embeddings in {os.path.join(self.path, 'config.json')}"
            return (value, where) if isinstance(value, int) and value > 0 else (None, None)
        if self.run_config is None:
            return None, None
        from megatron_pd.config.loader import load_config

        return load_config(self.run_config).data.seq_length, f"data.seq_length of {self.run_config}"

    def padded_vocab(self, model_cfg: ModelConfig, tp: int) -> int:
        """The teacher embedding's rows at tensor-parallel size ``tp``."""
        if self.kind == "hf":  # rows past the HF tensor's are zero (and not in the vocabulary)
            rows = int(model_cfg.padded_vocab_size)
            return -(-rows // tp) * tp
        from megatron.core import dist_checkpointing

        metadata = dist_checkpointing.load_tensors_metadata(self.checkpoint)
        for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if key in metadata:
                return int(metadata[key].global_shape[0])
        raise ValueError(f"teacher checkpoint {self.checkpoint} holds no word embedding")

    def trainer_state(self) -> dict:
        """The trainer state (step, tokenizer fingerprint, ...) a checkpoint recorded."""
        if self.kind == "hf":
            return {"step": None, "tokenizer_fingerprint": self.tokenizer_fingerprint()}
        from megatron.core import dist_checkpointing

        common = dist_checkpointing.load_common_state_dict(self.checkpoint)
        return common.get("trainer", {}) if isinstance(common, dict) else {}

    def tokenizer_fingerprint(self) -> str | None:
        if self.kind == "hf":
            if not os.path.isfile(os.path.join(self.path, "tokenizer.json")):
                return None
            from megatron_pd.data.tokenizer import HFTokenizer

            return HFTokenizer(self.path).fingerprint
        return self.trainer_state().get("tokenizer_fingerprint")

    def check_tokenizer(self, model_cfg, true_vocab: int, fingerprint: str | None) -> None:
        """Teacher and student must share the tokenizer (paddings may differ)."""
        if self.kind != "hf" and model_cfg.vocab_size not in (None, true_vocab):
            raise ValueError(
                f"teacher model.vocab_size={model_cfg.vocab_size} differs from the "
                f"student's vocabulary ({true_vocab}): they must share a tokenizer"
            )
        recorded = self.tokenizer_fingerprint()
        if fingerprint and recorded and recorded != fingerprint:
            what = "ships tokenizer" if self.kind == "hf" else "was trained with tokenizer"
            raise ValueError(
                f"teacher {self.path} {what} {recorded}, the student's data.tokenizer_model "
                f"is {fingerprint}: teacher, student and data must share one tokenizer"
            )

    def load_into(self, teacher: FrozenTeacher) -> None:
        if self.kind == "hf":
            from megatron_pd.models.hf_weights import load_hf_weights

            _, _, layout, index = self._hf_parts(teacher.cfg)
            load_hf_weights(teacher.model, index, layout)
        else:
            teacher.load(self.checkpoint)
        teacher.model.requires_grad_(False)
        teacher.model.eval()


def open_teacher(
    teacher_cfg, groups, true_vocab: int, tokenizer_fingerprint, seq_length: int, tp_rank: int
):
    """(FrozenTeacher, TeacherSource) for ``distill.teacher`` on this rank, loaded and checked.

    Every check that needs no weights (shape, vocabulary, tokenizer) runs before any loading.
    """
    from megatron_pd.engine.train_module import resolve_precision

    source = TeacherSource(teacher_cfg.load)
    model_cfg = source.model_config(teacher_cfg, true_vocab, seq_length)
    source.check_tokenizer(model_cfg, true_vocab, tokenizer_fingerprint)
    padded = source.padded_vocab(model_cfg, teacher_cfg.tp)
    if padded % teacher_cfg.tp or padded < true_vocab:
        raise ValueError(
            f"teacher {source.checkpoint} has a vocabulary of {padded} rows: not divisible by "
            f"distill.teacher.tp={teacher_cfg.tp} or smaller than the tokenizer's {true_vocab}"
        )
    teacher = FrozenTeacher(
        model_cfg,
        VocabInfo(true_vocab, padded, teacher_cfg.tp, tp_rank),
        groups,
        resolve_precision(teacher_cfg.precision),
        max_sequence_length=max(model_cfg.max_position_embeddings or 0, seq_length),
    )
    source.load_into(teacher)
    return teacher, source


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

        from megatron_pd.platform import safe_loading
        from megatron_pd.platform.faults import fault

        safe_loading.install()
        for param in self.model.parameters():
            param.fill_(float("nan"))
        fault("teacher_load")
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
        return self._forward(tokens_BS, hidden=False)

    @torch.no_grad()
    def hidden(self, tokens_BS: torch.Tensor) -> torch.Tensor | None:
        """The teacher's final (normed) hidden states [B, S, H] on its last stage (None
        elsewhere): what its output layer would turn into logits with ``output_weight``.
        Collective over the teacher's tp (and pp) groups."""
        return self._forward(tokens_BS, hidden=True)

    def output_weight(self) -> torch.Tensor:
        """This rank's [v, H] vocab shard of the teacher's output weight (last stage)."""
        return output_weight(self.model)

    @torch.no_grad()
    def kept_entries(self, tokens_BS, spec, chunk_tokens: int | None = None):
        """Top-p-k entries [B * S, K] (a SparseTeacher, the same on every teacher tp rank) of
        the last stage, made from the hidden states chunk by chunk: the full [B, S, v]
        logits never exist. None on other stages. Collective over the teacher's groups."""
        from megatron_pd.logits.truncation import truncate_hidden_vocab_parallel

        hidden = self.hidden(tokens_BS)
        if hidden is None:
            return None
        return truncate_hidden_vocab_parallel(
            hidden.reshape(-1, hidden.shape[-1]),
            self.output_weight(),
            self.vocab,
            spec,
            self.groups.tp,
            chunk_tokens,
        )

    def _forward(self, tokens_BS: torch.Tensor, hidden: bool) -> torch.Tensor | None:
        tokens_BS = tokens_BS.to(self.device)
        batch, seq = tokens_BS.shape
        positions = torch.arange(seq, device=self.device).expand(batch, seq)
        mask = causal_attention_mask(seq, self.device)
        if self.pp_size == 1:
            with hidden_output(self.model, hidden):
                return self.model(tokens_BS, positions, mask)
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        out = {}

        def forward_step(data_iterator, model):
            tokens = next(data_iterator)
            with hidden_output(model, hidden):
                output = model(tokens, positions, mask)

            def keep(output):
                out["output"] = output
                return output.sum() * 0.0, torch.tensor(1), {}

            return output, keep

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
        return out.get("output")

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
