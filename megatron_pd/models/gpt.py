"""Build a megatron-core GPTModel (one pipeline stage of it) from our ModelConfig.

Layer spec: transformer-engine's when ``model.transformer_impl`` asks for it (or ``auto`` and
both CUDA and transformer_engine are present), megatron-core's local spec with torch norms
otherwise. The vocabulary is padded to a multiple of ``make_vocab_size_divisible_by * tp``;
``VocabInfo`` carries both sizes so every loss can ignore the padded columns.

Shape legend: B batch, S sequence, V padded vocab, v this rank's vocab shard.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_pd.config.schema import ModelConfig
from megatron_pd.models.init import init_layout_invariant, mark_tensor_parallel
from megatron_pd.parallel.vocab import VocabInfo


def resolve_transformer_impl(requested: str) -> str:
    """'local' or 'transformer_engine'; raises if transformer_engine is asked for but unusable."""
    if requested == "local":
        return "local"
    try:
        import transformer_engine  # noqa: F401

        have_te = True
    except ImportError:
        have_te = False
    usable = have_te and torch.cuda.is_available()
    if requested == "transformer_engine" and not usable:
        why = "transformer_engine is not installed" if not have_te else "CUDA is not available"
        raise RuntimeError(f"model.transformer_impl=transformer_engine but {why}")
    return "transformer_engine" if usable else "local"


def build_transformer_config(
    model: ModelConfig,
    tp: int,
    pp: int,
    params_dtype: torch.dtype,
    sequence_parallel: bool = False,
):
    """megatron-core TransformerConfig for ``model`` at the given layout and precision."""
    from megatron.core.transformer import TransformerConfig

    activation = {
        "swiglu": (torch.nn.functional.silu, True),
        "geglu": (torch.nn.functional.gelu, True),
        "gelu": (torch.nn.functional.gelu, False),
    }[model.activation]
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        activation_func=activation[0],
        gated_linear_unit=activation[1],
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        rotary_interleaved=model.rotary_interleaved,
        init_method_std=model.init_method_std,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Weights are written by init_layout_invariant (same values at any TP/PP).
        perform_initialization=False,
        use_cpu_initialization=not on_gpu,
        # Our losses return (sum, token count): the schedule then averages over all tokens of
        # the global batch, whatever the micro-batching and masking.
        calculate_per_token_loss=True,
        # Batched p2p with several pipeline stages gave wrong gradients on gloo.
        batch_p2p_comm=False,
        # Fused kernels need CUDA (and apex/TE for some); keep the plain torch paths on CPU.
        bias_activation_fusion=on_gpu and model.add_bias_linear,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def layer_spec(model: ModelConfig):
    """The transformer-layer spec for the resolved implementation."""
    from megatron.core.models.gpt import gpt_layer_specs

    if resolve_transformer_impl(model.transformer_impl) == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=model.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        normalization=model.normalization, qk_layernorm=model.qk_layernorm
    )


def llama3_inv_freq(inv_freq: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Llama-3.1/3.2 RoPE frequencies: wavelengths longer than original / low_freq_factor are
    slowed by ``factor``, shorter than original / high_freq_factor kept, and the band between
    interpolated linearly in original / wavelength (the published Llama-3.1 rule)."""
    original = float(model.rope_original_max_positions)
    low, high = model.rope_low_freq_factor, model.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / model.rope_scaling_factor + smooth * inv_freq
    scaled = torch.where(
        wavelength > original / low, inv_freq / model.rope_scaling_factor, inv_freq
    )
    band = (wavelength <= original / low) & (wavelength >= original / high)
    return torch.where(band, blended, scaled)


def build_gpt_model(
    model: ModelConfig,
    vocab: VocabInfo,
    pg_collection,
    params_dtype: torch.dtype,
    seed: int,
    max_sequence_length: int,
    sequence_parallel: bool = False,
):
    """This rank's pipeline stage of a GPTModel, initialised layout-invariantly from ``seed``.

    ``pg_collection`` (megatron ProcessGroupCollection) gives the model its tp/pp/cp/embd
    groups, so two models with different layouts can live in one process. Collective only
    through megatron's embedding-group setup of tied weights when pp > 1.
    """
    from megatron.core.models.gpt import GPTModel

    tp = dist.get_world_size(pg_collection.tp)
    pp = dist.get_world_size(pg_collection.pp)
    pp_rank = dist.get_rank(pg_collection.pp)
    config = build_transformer_config(model, tp, pp, params_dtype, sequence_parallel)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model),
        vocab_size=vocab.padded_size,
        max_sequence_length=max_sequence_length,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=model.position_embedding,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        pg_collection=pg_collection,
    )
    if model.rope_scaling == "llama3" and model.position_embedding == "rope":
        # megatron-core's own llama3 scaling fixes low/high factors and the original length;
        # real configs may differ, so the frequencies are set here (before any forward)
        rope = gpt.rotary_pos_emb
        rope.inv_freq = llama3_inv_freq(rope.inv_freq, model)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    if device is not None:
        gpt = gpt.to(device)
    mark_tensor_parallel(gpt)
    init_layout_invariant(gpt, seed=seed, std=model.init_method_std, num_layers=model.num_layers)
    return gpt


def causal_attention_mask(seq_length: int, device=None) -> torch.Tensor:
    """Boolean [1, 1, S, S] mask, True above the diagonal (positions a query may not see).

    Passed explicitly because megatron-core's default mask is created on "cuda".
    """
    ones = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)[None, None]


def count_parameters(model_cfg: ModelConfig, vocab_padded: int) -> dict:
    """Analytic parameter counts of the whole (unsharded) model: total and non-embedding."""
    hidden, ffn, layers = model_cfg.hidden_size, model_cfg.ffn_hidden_size, model_cfg.num_layers
    head_dim, heads, groups = (
        model_cfg.head_dim,
        model_cfg.num_attention_heads,
        model_cfg.query_groups,
    )
    qkv = hidden * head_dim * (heads + 2 * groups)
    proj = heads * head_dim * hidden
    mlp = hidden * ffn * (3 if model_cfg.activation in ("swiglu", "geglu") else 2)
    norms = 2 * hidden
    per_layer = qkv + proj + mlp + norms
    embedding = vocab_padded * hidden
    output = 0 if model_cfg.tie_embeddings else vocab_padded * hidden
    non_embedding = layers * per_layer + hidden
    return {
        "total": non_embedding + embedding + output,
        "non_embedding": non_embedding,
        "embedding": embedding,
        "output": output,
    }


def seed_rngs(seed: int, tp_rank: int) -> None:
    """Seed torch and megatron's RNG-states tracker (dropout streams) for this rank.

    The default stream is shared by tensor-parallel peers; megatron's model-parallel stream
    differs per tp rank. Must run before the first forward pass.
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    model_parallel_cuda_manual_seed(
        seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0, force_reset_rng=True
    )


class HiddenOutput:
    """Lets a GPTModel's last stage return its final hidden states instead of logits.

    The output layer is the model's last operation; with ``hidden_output(gpt)`` active the
    model skips it and returns the (final-norm) hidden states [B, S, H] where it would return
    logits [B, S, v] (with sequence parallelism: this rank's [B, S/tp, H] sequence shard), so a
    fused output layer + loss (loss/fused_linear.py) can take them with ``output_weight(gpt)``.
    The switch is per model instance (the output layer's bound ``forward``); parameters and
    state-dict keys are unchanged. Outside the context the model computes logits as before.
    """

    def __init__(self, output_layer):
        self.output_layer = output_layer
        self.active = False
        self._original = output_layer.forward
        output_layer.forward = self._forward

    def _forward(self, hidden_states, *args, **kwargs):
        if self.active:
            return hidden_states, None
        return self._original(hidden_states, *args, **kwargs)


def _unwrap(model):
    """The GPTModel inside megatron's DDP (and Float16Module) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@contextmanager
def hidden_output(model, enabled: bool = True):
    """While active, ``model`` (a GPTModel, optionally DDP-wrapped) returns its final hidden
    states instead of logits on its last stage (see HiddenOutput); a no-op elsewhere."""
    gpt = _unwrap(model)
    layer = getattr(gpt, "output_layer", None) if gpt.post_process else None
    if not enabled or layer is None:
        yield
        return
    switch = getattr(layer, "_hidden_switch", None)
    if switch is None:
        switch = layer._hidden_switch = HiddenOutput(layer)
    switch.active = True
    try:
        yield
    finally:
        switch.active = False


def output_weight(model) -> torch.Tensor:
    """This rank's [v, H] vocab shard of the output weight: the output layer's own, or the
    word embedding's when they are tied (on the last stage: megatron's synced copy)."""
    gpt = _unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight
