"""The typed configuration tree of a megatron_pd run (one dataclass per section).

Every field has a default and a docstring (the string literal after it; ``--help-config``
prints them). Each section validates itself in ``__post_init__`` and raises ``ValueError``
naming ``section.field`` and the offending value; checks that span sections live in
``Config.__post_init__``; checks that need the world size or the tokenizer live in
``validate_for_world`` and the data module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

SCHEDULE_STYLES = ("constant", "linear", "cosine", "wsd", "periodic")
DECAY_SHAPES = ("linear", "cosine", "sqrt", "exponential")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")


def _fail(path: str, value, why: str):
    raise ValueError(f"{path}={value!r}: {why}")


def _positive(path: str, value) -> None:
    if value is None or value <= 0:
        _fail(path, value, "must be > 0")


def _choice(path: str, value, choices) -> None:
    if value not in choices:
        _fail(path, value, f"must be one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """Shape and flavour of a megatron-core GPTModel (Llama/GLM style by default)."""

    preset: Optional[str] = None
    """Name of a preset in megatron_pd.config.presets; its values are the defaults that any
    other field given alongside overrides."""
    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width H."""
    ffn_hidden_size: int = 256
    """Inner width of the MLP (per gate/up branch when gated)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None means multi-head (= heads)."""
    kv_channels: Optional[int] = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    vocab_size: Optional[int] = None
    """True vocabulary size (the tokenizer's); None takes it from the tokenizer. The model's
    embedding is padded above this, and every loss uses only the true vocabulary."""
    make_vocab_size_divisible_by: int = 128
    """The padded vocabulary is a multiple of this times the tensor-parallel size."""
    max_position_embeddings: Optional[int] = None
    """Longest sequence the model supports; None means data.seq_length."""
    tie_embeddings: bool = True
    """Share the input embedding and the output (LM head) weight."""
    normalization: str = "RMSNorm"
    """RMSNorm or LayerNorm."""
    norm_epsilon: float = 1e-5
    """Epsilon of the norms."""
    activation: str = "swiglu"
    """swiglu (gated SiLU), geglu (gated GELU) or gelu (plain MLP)."""
    position_embedding: str = "rope"
    """rope or learned_absolute."""
    rotary_base: int = 10000
    """RoPE base (theta)."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions rotated by RoPE (GLM-4 rotates half)."""
    rotary_interleaved: bool = False
    """RoPE rotates interleaved pairs of dimensions (0,1), (2,3), ... (GLM-4) instead of the
    two halves of the rotated dimensions (Llama, Qwen, Mistral)."""
    rope_scaling: str = "none"
    """none, or llama3 (Llama-3.1/3.2 frequency scaling, with the rope_* fields below)."""
    rope_scaling_factor: float = 8.0
    """llama3 RoPE scaling: factor (8 in Llama-3.1, 32 in Llama-3.2)."""
    rope_low_freq_factor: float = 1.0
    """llama3 RoPE scaling: low_freq_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 RoPE scaling: high_freq_factor."""
    rope_original_max_positions: int = 8192
    """llama3 RoPE scaling: original_max_position_embeddings."""
    qk_layernorm: bool = False
    """Normalise each query and key head (model.normalization over the head dimension) before
    RoPE (Qwen3)."""
    hf_architecture: Optional[str] = None
    """The Hugging Face architecture an export writes (set by an import, so a converted
    MistralForCausalLM exports as one); None: the one that expresses the model (Llama, Qwen2,
    Qwen3 or GLM)."""
    hf_vocab_rows: Optional[int] = None
    """The embedding rows of the Hugging Face model this one was imported from (its
    config.json vocab_size): the checkpoint pads them with zero rows to a multiple of 128 so
    it loads at any TP, and an export writes exactly these rows again."""
    padded_vocab_size: Optional[int] = None
    """Rows of the embedding and output layer when a checkpoint fixes them (an imported Hugging
    Face model's vocab_size, e.g. 152,064 for a 151,665-token tokenizer); None pads the true
    vocabulary to a multiple of make_vocab_size_divisible_by * tp."""
    add_bias_linear: bool = False
    """Biases in all linear layers."""
    add_qkv_bias: bool = False
    """Bias in the query/key/value projection only (GLM-4, Qwen)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches."""
    transformer_impl: str = "auto"
    """auto (transformer-engine layer spec when it imports and CUDA is present, else local),
    local, or transformer_engine (an error when it cannot be used)."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
            _positive(f"model.{name}", getattr(self, name))
        _positive("model.make_vocab_size_divisible_by", self.make_vocab_size_divisible_by)
        if self.vocab_size is not None:
            _positive("model.vocab_size", self.vocab_size)
        if self.num_query_groups is not None:
            _positive("model.num_query_groups", self.num_query_groups)
            if self.num_attention_heads % self.num_query_groups:
                _fail(
                    "model.num_query_groups",
                    self.num_query_groups,
                    f"must divide model.num_attention_heads={self.num_attention_heads}",
                )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            _fail(
                "model.hidden_size",
                self.hidden_size,
                f"must be divisible by model.num_attention_heads={self.num_attention_heads} "
                "(or set model.kv_channels)",
            )
        _choice("model.normalization", self.normalization, ("RMSNorm", "LayerNorm"))
        _choice("model.activation", self.activation, ("swiglu", "geglu", "gelu"))
        _choice("model.position_embedding", self.position_embedding, ("rope", "learned_absolute"))
        _choice("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        if not 0.0 < self.rotary_percent <= 1.0:
            _fail("model.rotary_percent", self.rotary_percent, "must be in (0, 1]")
        _choice("model.rope_scaling", self.rope_scaling, ("none", "llama3"))
        if self.rope_scaling == "llama3":
            _positive("model.rope_scaling_factor", self.rope_scaling_factor)
            _positive("model.rope_original_max_positions", self.rope_original_max_positions)
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                _fail(
                    "model.rope_low_freq_factor",
                    self.rope_low_freq_factor,
                    "must be > 0 and below model.rope_high_freq_factor="
                    f"{self.rope_high_freq_factor}",
                )
        if self.padded_vocab_size is not None:
            _positive("model.padded_vocab_size", self.padded_vocab_size)
            if self.vocab_size is not None and self.padded_vocab_size < self.vocab_size:
                _fail(
                    "model.padded_vocab_size",
                    self.padded_vocab_size,
                    f"is smaller than model.vocab_size={self.vocab_size}",
                )
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(f"model.{name}", getattr(self, name), "must be in [0, 1)")

    @property
    def query_groups(self) -> int:
        """Key/value heads (resolves the multi-head default)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    """Parallel layout of the student (the data-parallel size is what remains of the world)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (1F1B schedule of megatron-core)."""
    distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (megatron DistributedOptimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (GPU)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1 and the transformer-engine norms)."""

    def __post_init__(self):
        _positive("parallel.tp", self.tp)
        _positive("parallel.pp", self.pp)
        if self.sequence_parallel and self.tp == 1:
            _fail("parallel.sequence_parallel", True, "needs parallel.tp > 1")


@dataclass
class DataConfig:
    """Token data (megatron .bin/.idx prefixes) and the tokenizer that made it."""

    tokenizer_model: Optional[str] = None
    """The tokenizer that tokenized the data: a SentencePiece .model, an HF tokenizer.json, or
    an HF model/tokenizer directory (e.g. the teacher's own)."""
    blend: list[str] = field(default_factory=list)
    """Data prefixes (path without .bin/.idx), megatron style: ["p1", "p2"] or with weights
    ["0.7", "p1", "0.3", "p2"]."""
    split: str = "98,1,1"
    """Train/valid/test proportions of the documents."""
    seq_length: int = 256
    """Tokens per sample."""
    seed: int = 1234
    """Seed of megatron's document/sample shuffle (defines the sample order)."""
    cache_dir: Optional[str] = None
    """Where megatron's dataset index caches go; None means <run_dir>/data_cache."""
    eod_mask_loss: bool = False
    """Exclude end-of-document targets from the loss."""
    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self):
        _positive("data.seq_length", self.seq_length)
        parts = self.split.replace("/", ",").split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            _fail("data.split", self.split, "must be comma-separated numbers like 98,1,1")
        if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
            _fail("data.split", self.split, "needs three non-negative weights, not all zero")
        if self.num_workers < 0:
            _fail("data.num_workers", self.num_workers, "must be >= 0")


@dataclass
class TrainConfig:
    """Batch sizes, length of the run, evaluation cadence, precision and seeds."""

    micro_batch_size: int = 4
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks (with gradient accumulation)."""
    train_steps: Optional[int] = 100
    """Optimizer steps; exactly one of train_steps and train_tokens is set."""
    train_tokens: Optional[int] = None
    """Train on this many tokens (steps = ceil(tokens / (global_batch_size * seq_length)))."""
    eval_interval: int = 50
    """Validate every this many steps (and at the end); 0 disables."""
    eval_batches: int = 4
    """Global batches per validation."""
    seed: int = 1234
    """Seed of the model initialisation (layout-invariant: same weights at any TP/PP)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16 (mixed precision, fp32 master)."""
    stop_after_steps: Optional[int] = None
    """Stop (without a final checkpoint) once this step is done; for tests of resumption."""
    record_logits: Optional[str] = None
    """Record this run's own top-p-k logits of every training sample into a logits store at
    this path (the paper's "online logits" of a teacher's pre-training)."""
    record_truncation: str = "top-0.95-100"
    """The truncation of recorded logits (top-P-K)."""
    max_skipped_steps: int = 5
    """A step whose loss (lm or kd term) or gradient is not finite is skipped - no optimizer
    update, its batch dropped - and logged; this many in a row stop the run with an error."""
    spike_factor: Optional[float] = None
    """Roll back on a loss spike: when a step's training loss exceeds this factor times its
    running mean (after spike_warmup_steps), reload the last checkpoint and go on with the
    batches after the spike (the ones since that checkpoint are skipped). None: no rollback."""
    spike_warmup_steps: int = 20
    """Steps of running mean before spikes are looked for."""
    max_rollbacks: int = 3
    """Loss-spike rollbacks allowed in a run; one more is an error."""

    def __post_init__(self):
        _positive("train.micro_batch_size", self.micro_batch_size)
        _positive("train.max_skipped_steps", self.max_skipped_steps)
        if self.spike_factor is not None and not self.spike_factor > 1.0:
            _fail("train.spike_factor", self.spike_factor, "must be > 1 (or null: no rollback)")
        if self.spike_warmup_steps < 0:
            _fail("train.spike_warmup_steps", self.spike_warmup_steps, "must be >= 0")
        if self.max_rollbacks < 0:
            _fail("train.max_rollbacks", self.max_rollbacks, "must be >= 0")
        _positive("train.global_batch_size", self.global_batch_size)
        if (self.train_steps is None) == (self.train_tokens is None):
            _fail(
                "train.train_steps",
                self.train_steps,
                f"set exactly one of train.train_steps and train.train_tokens "
                f"(train_tokens={self.train_tokens!r})",
            )
        if self.train_steps is not None:
            _positive("train.train_steps", self.train_steps)
        if self.train_tokens is not None:
            _positive("train.train_tokens", self.train_tokens)
        if self.eval_interval < 0:
            _fail("train.eval_interval", self.eval_interval, "must be >= 0")
        _positive("train.eval_batches", self.eval_batches)
        _choice("train.precision", self.precision, PRECISIONS)
        if self.record_logits is not None:
            from megatron_pd.logits.truncation import TruncationSpec

            try:
                TruncationSpec.parse(self.record_truncation)
            except ValueError as err:
                raise ValueError(
                    f"train.record_truncation={self.record_truncation!r}: {err}"
                ) from None


@dataclass
class OptimizerConfig:
    """megatron-core optimizer settings (the learning rate itself follows lr_schedule)."""

    name: str = "adamw"
    """adamw (decoupled weight decay), adam (L2 in the gradient) or sgd."""
    weight_decay: float = 0.1
    """Weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    def __post_init__(self):
        _choice("optimizer.name", self.name, ("adamw", "adam", "sgd"))
        if self.weight_decay < 0:
            _fail("optimizer.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(f"optimizer.{name}", getattr(self, name), "must be in [0, 1)")
        if self.clip_grad < 0:
            _fail("optimizer.clip_grad", self.clip_grad, "must be >= 0 (0 disables clipping)")


@dataclass
class ScheduleConfig:
    """A scalar that follows the training step: the learning rate, alpha and tau.

    Phases: warmup (initial -> value), then by style: constant holds value; linear and cosine
    go from value to final over the remaining steps; wsd holds value and decays to final over
    the last decay_fraction of the run with decay_shape; periodic swings between value and
    final with period_steps (a cosine wave starting at value).
    """

    style: str = "constant"
    """constant, linear, cosine, wsd or periodic."""
    value: float = 1.0
    """Value after warmup (the peak; what constant holds)."""
    final: float = 0.0
    """Value at the end of the decay (linear/cosine/wsd) or the other end of a period."""
    initial: float = 0.0
    """Value at step 0, where the warmup starts."""
    warmup_steps: Optional[int] = None
    """Warmup length in steps (takes precedence over warmup_fraction)."""
    warmup_fraction: float = 0.0
    """Warmup length as a fraction of the run."""
    decay_fraction: float = 0.1
    """wsd: the last fraction of the run spent decaying."""
    decay_shape: str = "linear"
    """wsd decay shape: linear, cosine, sqrt (1 - sqrt, MiniCPM) or exponential."""
    period_steps: int = 1000
    """periodic: steps per full cycle."""

    def validate(self, path: str) -> None:
        _choice(f"{path}.style", self.style, SCHEDULE_STYLES)
        _choice(f"{path}.decay_shape", self.decay_shape, DECAY_SHAPES)
        if self.warmup_steps is not None and self.warmup_steps < 0:
            _fail(f"{path}.warmup_steps", self.warmup_steps, "must be >= 0")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            _fail(f"{path}.warmup_fraction", self.warmup_fraction, "must be in [0, 1]")
        if not 0.0 <= self.decay_fraction <= 1.0:
            _fail(f"{path}.decay_fraction", self.decay_fraction, "must be in [0, 1]")
        if self.style == "wsd" and self.warmup_steps is None:
            if self.warmup_fraction + self.decay_fraction > 1.0:
                _fail(
                    f"{path}.decay_fraction",
                    self.decay_fraction,
                    f"plus warmup_fraction={self.warmup_fraction} exceeds the whole run",
                )
        _positive(f"{path}.period_steps", self.period_steps)
        if self.style == "wsd" and self.decay_shape == "exponential":
            if self.final <= 0 or self.value <= 0:
                _fail(f"{path}.final", self.final, "exponential decay needs value and final > 0")


def _lr_schedule_default() -> ScheduleConfig:
    return ScheduleConfig(style="cosine", value=3e-4, final=3e-5, warmup_fraction=0.01)


KD_LOSSES = ("soft_ce", "forward_kl", "reverse_kl", "jsd", "mse_probs", "mse_logits")


def _alpha_default() -> ScheduleConfig:
    return ScheduleConfig(style="constant", value=1.0, final=1.0, initial=1.0)


def _tau_default() -> ScheduleConfig:
    return ScheduleConfig(style="constant", value=1.0, final=1.0, initial=1.0)


@dataclass
class TeacherConfig:
    """The frozen teacher of online distillation (co-located with the student)."""

    load: Optional[str] = None
    """A megatron_pd run directory (its config.yaml and latest checkpoint), a checkpoint root
    (with a "latest" file) or one iter_NNNNNNN directory. None disables distillation."""
    model: Optional[ModelConfig] = None
    """The teacher's shape; None reads it from the run's config.yaml next to the checkpoint."""
    tp: int = 1
    """The teacher's tensor-parallel size (independent of the student's)."""
    pp: int = 1
    """The teacher's pipeline-parallel size."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16: the teacher's forward dtype."""

    def __post_init__(self):
        _positive("distill.teacher.tp", self.tp)
        _positive("distill.teacher.pp", self.pp)
        _choice("distill.teacher.precision", self.precision, PRECISIONS)


@dataclass
class DistillConfig:
    """Pre-training distillation: L = (1 - alpha) * L_lm + alpha * L_kd (see loss/spec.py)."""

    preset: Optional[str] = None
    """vanilla_pd or pd_star (the paper's settings); other fields given alongside override."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: str = "forward_kl"
    """KD loss: soft_ce (the paper's NLL), forward_kl (KLD), reverse_kl, jsd, mse_probs,
    mse_logits."""
    alpha: ScheduleConfig = field(default_factory=_alpha_default)
    """Weight of the KD term over training (value in [0, 1])."""
    tau: ScheduleConfig = field(default_factory=_tau_default)
    """Temperature over training (> 0)."""
    align_alpha_with_lr: bool = False
    """Make alpha a WSD schedule with the learning rate's warmup and decay phases (the
    paper's best WSD-alpha + WSD-LR); alpha.value is the plateau, alpha.initial/final the
    ends."""
    tau_on_student: bool = True
    """Divide the student logits by tau as well (else only the teacher's)."""
    tau_squared: bool = False
    """Multiply the KD term by tau^2 (Hinton's gradient-scale correction)."""
    jsd_beta: float = 0.5
    """Mixture weight of the teacher in JSD."""
    truncation: Optional[str] = None
    """Top-p-k truncation of the teacher, e.g. top-0.95-100, top-0.95-inf, top-1.0-50; None
    keeps the full distribution."""
    min_k: int = 1
    """Keep at least this many teacher entries per token."""
    k_cap: int = 1024
    """Entry slots per token when the truncation has no k cap (top-p-inf)."""
    tail: Optional[bool] = None
    """Model the truncated teacher mass as one extra category (see loss/spec.py). None: true
    whenever the teacher is truncated (distill.truncation, or a store, which is always a cut),
    as the explorer's studies found it better at small scale (docs/findings.md); false keeps
    the paper's choice of dropping the cut mass."""
    exchange: str = "auto"
    """How teacher outputs reach the student ranks: dense (vocab slices), sparse (kept
    entries; needs truncation), hidden (the teacher's final hidden states, 2 x H_t bytes per
    token in bf16; each student loss rank holds the teacher's output-weight rows of its own
    vocab shard and makes the full teacher distribution itself) or auto (sparse when
    truncating, else dense)."""
    store: Optional[str] = None
    """Offline distillation: a logits store written by tools/dump_teacher_logits.py (or by a
    teacher's pre-training run) instead of a live teacher."""
    store_steps: Optional[list[int]] = None
    """[first, last]: with a store recorded during a teacher's pre-training
    (train.record_logits), learn from the logits of its training steps first..last only -
    the paper's early vs late online logits. The student's data starts at the first sample
    the teacher trained on at step ``first`` (same data config, any student batch size), and
    reading a sample recorded outside the window is an error."""

    def __post_init__(self):
        _choice("distill.loss", self.loss, KD_LOSSES)
        if self.tail is None:
            self.tail = self.store is not None or self.truncation is not None
        self.alpha.validate("distill.alpha")
        self.tau.validate("distill.tau")
        for end in ("value", "final", "initial"):
            a = getattr(self.alpha, end)
            if not 0.0 <= a <= 1.0:
                _fail(f"distill.alpha.{end}", a, "must be in [0, 1]")
        tau = self.tau
        used = ["value"]
        if tau.style != "constant":
            used.append("final")
        if (tau.warmup_steps or 0) > 0 or tau.warmup_fraction > 0:
            used.append("initial")
        for end in used:
            if not getattr(tau, end) > 0.0:
                _fail(f"distill.tau.{end}", getattr(tau, end), "must be > 0")
        if not 0.0 < self.jsd_beta < 1.0:
            _fail("distill.jsd_beta", self.jsd_beta, "must be in (0, 1)")
        _choice("distill.exchange", self.exchange, ("auto", "dense", "sparse", "hidden"))
        if self.truncation is not None:
            from megatron_pd.logits.truncation import TruncationSpec

            try:
                TruncationSpec.parse(self.truncation, self.min_k, self.k_cap)
            except ValueError as err:
                raise ValueError(f"distill.truncation={self.truncation!r}: {err}") from None
        elif self.exchange == "sparse":
            _fail("distill.exchange", "sparse", "needs distill.truncation (e.g. top-0.95-100)")
        if self.store is not None and self.teacher.load is not None:
            _fail(
                "distill.store",
                self.store,
                "and distill.teacher.load are exclusive: train "
                "from the store or from a live teacher",
            )
        if self.store_steps is not None:
            if self.store is None:
                _fail("distill.store_steps", self.store_steps, "needs distill.store")
            steps = self.store_steps
            if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
                _fail("distill.store_steps", steps, "must be [first, last] with 1 <= first <= last")
        if self.store is not None and self.loss == "mse_logits":
            _fail("distill.loss", "mse_logits", "needs the full teacher (a store is truncated)")
        if self.store is not None and self.loss == "reverse_kl" and not self.tail:
            _fail("distill.loss", "reverse_kl", "from a store needs distill.tail=true")
        if self.truncation is not None and self.loss == "mse_logits":
            _fail("distill.loss", "mse_logits", "needs the full teacher (truncation=null)")
        if self.truncation is not None and self.loss == "reverse_kl" and not self.tail:
            _fail("distill.loss", "reverse_kl", "with truncation needs distill.tail=true")

    @property
    def enabled(self) -> bool:
        return self.teacher.load is not None or self.store is not None

    @property
    def offline(self) -> bool:
        return self.store is not None

    @property
    def exchange_mode(self) -> str:
        if self.exchange != "auto":
            return self.exchange
        return "sparse" if self.truncation is not None else "dense"


@dataclass
class LossConfig:
    """How the (distillation) loss is computed; what it computes lives in ``distill``."""

    implementation: str = "auto"
    """auto (triton on CUDA, else torch), torch (fused vocab-parallel), triton (GPU kernels;
    an error where Triton cannot run), compiled (the same row kernels as torch code compiled
    by inductor: fused C++ loops on CPU, which needs a C++ compiler, ~5-10 s of compiling per
    loss configuration on first use) or reference (gathers the vocabulary; debugging)."""
    chunk_tokens: Optional[int] = None
    """Tokens per chunk of the loss's [tokens x vocab shard] work, on the logits path and in
    the fused output layer. None: the logits path's chunks are ~4 MB of fp32 per buffer; the
    fused output layer's are larger, as its GEMMs need (loss/fused_linear.py,
    default_fused_chunk: 208 rows at a 151,552-wide shard on CPU, 384 on CUDA)."""
    fused_output_layer: bool = True
    """Fuse the output layer into the loss: the student's final hidden states and its output
    weight shard go into one chunked Function (loss/fused_linear.py), and a live teacher's
    top-p-k entries are made from its hidden states chunk by chunk, so no [tokens x vocab]
    logits (or their gradient) exist on either side. false computes full logits first (the
    reference path; also what train.record_logits of a non-fused run reads)."""
    check_inputs: bool = False
    """Also check the loss inputs' values every step (labels in the vocabulary, teacher ids
    in range and unique, log-probs <= 0). Shapes are always checked; the values are checked
    where they are produced (truncation, store decode), so this is for debugging."""

    def __post_init__(self):
        _choice(
            "loss.implementation",
            self.implementation,
            ("auto", "torch", "triton", "compiled", "reference"),
        )
        if self.chunk_tokens is not None:
            _positive("loss.chunk_tokens", self.chunk_tokens)


@dataclass
class CheckpointConfig:
    """Checkpoint saving (megatron dist_checkpointing) and resumption."""

    save_dir: Optional[str] = None
    """Where checkpoints go; None means <run_dir>/checkpoints."""
    save_interval: int = 0
    """Save every this many steps (and at the end of the run); 0 saves only at the end."""
    resume: bool = True
    """Resume from the latest checkpoint in save_dir when there is one."""
    load_dir: Optional[str] = None
    """Resume from this directory's latest checkpoint instead of save_dir's."""
    init_from: Optional[str] = None
    """Start a new run (no checkpoint of its own yet) from these weights - a megatron_pd run
    directory, checkpoint root or checkpoint (e.g. a converted HF model), or a Hugging Face
    model directory: continued pre-training or a pruned initialisation. Weights only: the
    optimizer, step and data position start fresh. The model shape must match."""
    keep_last: int = 2
    """Keep this many newest checkpoints (older ones are deleted after a good save); 0 keeps
    all."""
    async_save: bool = False
    """Write checkpoints in the background; "latest" moves only when the write completed."""
    fallback: bool = False
    """When the latest checkpoint is damaged (a missing or truncated file, unreadable
    metadata), resume from the newest intact earlier one, with a loud warning; false makes a
    damaged latest checkpoint an error naming what is wrong."""
    final_save: bool = True
    """Save at the end of training."""

    def __post_init__(self):
        if self.save_interval < 0:
            _fail("checkpoint.save_interval", self.save_interval, "must be >= 0")
        if self.keep_last < 0:
            _fail("checkpoint.keep_last", self.keep_last, "must be >= 0")


@dataclass
class LoggingConfig:
    """Console and TensorBoard output."""

    log_interval: int = 1
    """Print the progress line every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard scalars to <run_dir>/tensorboard."""
    metrics_interval: int = 10
    """Compute the distillation metrics that cost extra passes over the vocabulary (teacher
    entropy, top-1 agreement) every this many steps (and at every validation); 1 computes
    them on every step. Steps without them log no value for them."""

    def __post_init__(self):
        _positive("logging.log_interval", self.log_interval)
        _positive("logging.metrics_interval", self.metrics_interval)


@dataclass
class Config:
    """A whole run. ``run_dir`` holds config.yaml, metrics, TensorBoard and checkpoints."""

    run_dir: str = "runs/default"
    """Output directory of the run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: ScheduleConfig = field(default_factory=_lr_schedule_default)
    """The learning rate over training."""
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        self.lr_schedule.validate("lr_schedule")
        model, parallel = self.model, self.parallel
        if model.num_attention_heads % parallel.tp:
            _fail(
                "parallel.tp",
                parallel.tp,
                f"must divide model.num_attention_heads={model.num_attention_heads}",
            )
        if model.query_groups % parallel.tp:
            _fail(
                "parallel.tp",
                parallel.tp,
                f"must divide the key/value heads (model.num_query_groups={model.query_groups})",
            )
        if model.ffn_hidden_size % parallel.tp:
            _fail(
                "parallel.tp",
                parallel.tp,
                f"must divide model.ffn_hidden_size={model.ffn_hidden_size}",
            )
        if model.padded_vocab_size is not None and model.padded_vocab_size % parallel.tp:
            _fail(
                "parallel.tp",
                parallel.tp,
                f"must divide model.padded_vocab_size={model.padded_vocab_size}",
            )
        if model.num_layers % parallel.pp:
            _fail(
                "parallel.pp",
                parallel.pp,
                f"must divide model.num_layers={model.num_layers}",
            )
        max_pos = model.max_position_embeddings
        if max_pos is not None and max_pos < self.data.seq_length:
            _fail(
                "data.seq_length",
                self.data.seq_length,
                f"exceeds model.max_position_embeddings={max_pos}",
            )
        if self.optimizer.name == "sgd" and parallel.distributed_optimizer:
            _fail(
                "optimizer.name",
                "sgd",
                "megatron's distributed optimizer supports adam/adamw only "
                "(set parallel.distributed_optimizer=false)",
            )
        if self.train.global_batch_size % self.train.micro_batch_size:
            _fail(
                "train.global_batch_size",
                self.train.global_batch_size,
                f"must be a multiple of train.micro_batch_size={self.train.micro_batch_size}",
            )

        if self.distill.align_alpha_with_lr and self.lr_schedule.style != "wsd":
            _fail(
                "distill.align_alpha_with_lr",
                True,
                f"needs lr_schedule.style=wsd (is {self.lr_schedule.style})",
            )

    def alpha_schedule(self) -> ScheduleConfig:
        """The alpha schedule in force (WSD with the LR's phases when aligned)."""
        alpha = self.distill.alpha
        if not self.distill.align_alpha_with_lr:
            return alpha
        lr = self.lr_schedule
        return ScheduleConfig(
            style="wsd",
            value=alpha.value,
            final=alpha.final,
            initial=alpha.initial,
            warmup_steps=lr.warmup_steps,
            warmup_fraction=lr.warmup_fraction,
            decay_fraction=lr.decay_fraction,
            decay_shape=lr.decay_shape,
        )

    def validate_for_world(self, world_size: int) -> int:
        """Checks that need the number of processes; returns the data-parallel size."""
        model_parallel = self.parallel.tp * self.parallel.pp
        if world_size % model_parallel:
            _fail(
                "parallel.tp",
                self.parallel.tp,
                f"tp*pp={model_parallel} must divide the world size {world_size}",
            )
        dp = world_size // model_parallel
        if self.distill.enabled:
            teacher = self.distill.teacher
            if world_size % (teacher.tp * teacher.pp):
                _fail(
                    "distill.teacher.tp",
                    teacher.tp,
                    f"teacher tp*pp={teacher.tp * teacher.pp} must divide the world size "
                    f"{world_size}",
                )
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            _fail(
                "train.global_batch_size",
                self.train.global_batch_size,
                f"must be a multiple of micro_batch_size*dp = {self.train.micro_batch_size}*{dp}",
            )
        return dp

    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        if self.train.train_steps is not None:
            return self.train.train_steps
        tokens_per_step = self.train.global_batch_size * self.data.seq_length
        return math.ceil(self.train.train_tokens / tokens_per_step)
