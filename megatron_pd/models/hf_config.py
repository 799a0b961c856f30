"""Hugging Face ``config.json`` <-> ModelConfig for the decoder families megatron_pd reads/writes.

Families, each read from its config.json alone (both the older layout with ``rope_theta`` /
``rope_scaling`` / ``partial_rotary_factor`` at the top level, as checkpoints on the hub carry,
and transformers 5's ``rope_parameters``):

| architecture       | megatron-core layout                                               |
|--------------------|--------------------------------------------------------------------|
| LlamaForCausalLM   | RMSNorm, SwiGLU, RoPE (llama3 scaling), GQA, tied or untied        |
| MistralForCausalLM | as Llama; an active sliding window is an error                     |
| Qwen2ForCausalLM   | as Llama with a QKV bias                                           |
| Qwen3ForCausalLM   | as Llama with q/k RMSNorm per head and an explicit head_dim        |
| GlmForCausalLM     | QKV bias, RoPE on half of each head, interleaved pairs, fused gate_up |

Anything else - another architecture, a RoPE scaling type other than llama3, biases megatron's
layers cannot hold, a non-gated or tanh-GELU MLP - is a ValueError naming the file, the field and
the supported values. The true vocabulary comes from the tokenizer; ``vocab_size`` of
config.json is the embedding's rows (``model.padded_vocab_size``), which may be larger
(Qwen2.5-14B: 152,064 rows for 151,665 tokens).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from megatron_pd.config.schema import ModelConfig

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Family:
    """How one HF architecture lays out its decoder (what the weight mapping needs)."""

    architecture: str
    model_type: str
    qkv_bias: str  # "never", "always" or "attention_bias" (the config field decides)
    o_proj_bias: bool  # whether attention_bias also puts a bias on o_proj
    qk_norm: bool = False
    fused_gate_up: bool = False  # one gate_up_proj ([gate; up]) instead of gate_proj/up_proj
    interleaved_rope: bool = False


FAMILIES = {
    f.architecture: f
    for f in (
        Family("LlamaForCausalLM", "llama", "attention_bias", o_proj_bias=True),
        Family("MistralForCausalLM", "mistral", "never", o_proj_bias=False),
        Family("Qwen2ForCausalLM", "qwen2", "always", o_proj_bias=False),
        Family("Qwen3ForCausalLM", "qwen3", "attention_bias", o_proj_bias=True, qk_norm=True),
        Family(
            "GlmForCausalLM",
            "glm",
            "attention_bias",
            o_proj_bias=False,
            fused_gate_up=True,
            interleaved_rope=True,
        ),
    )
}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}
# Class defaults transformers applies when a config.json leaves a field out.
_DEFAULTS = {
    "llama": {"attention_bias": False, "tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "mistral": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "sliding_window": 4096},
    "qwen2": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "qwen3": {
        "attention_bias": False,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
        "head_dim": 128,
    },
    "glm": {
        "attention_bias": True,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1.5625e-7,
        "head_dim": 128,
        "partial_rotary_factor": 0.5,
    },
}
_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def is_hf_model_dir(path: str) -> bool:
    """A directory with a config.json next to weights or a tokenizer (an HF model directory)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir} has no {CONFIG_FILE}: not a Hugging Face model directory")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def family_of(config: dict, where: str) -> Family:
    """The Family of a config (``architectures[0]``, else ``model_type``)."""
    names = config.get("architectures") or []
    name = names[0] if isinstance(names, list) and names else None
    family = FAMILIES.get(name) if name else _BY_MODEL_TYPE.get(config.get("model_type"))
    if family is None:
        shown = name or config.get("model_type")
        raise ValueError(
            f"{where}: architectures={shown!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    return family


class _Fields:
    """config.json values with the family's defaults and errors that name the field."""

    def __init__(self, config: dict, family: Family, where: str):
        self.config, self.where = config, where
        self.defaults = _DEFAULTS[family.model_type]

    def get(self, name: str, default=None):
        if name in self.config and self.config[name] is not None:
            return self.config[name]
        return self.defaults.get(name, default)

    def need(self, name: str) -> int:
        value = self.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{self.where}: {name}={value!r} must be a positive integer")
        return value

    def count(self, name: str, default=None):
        """A positive integer field, or ``default`` when absent or null."""
        value = self.get(name)
        if value is None:
            return default
        return self.need(name)

    def number(self, name: str, default=None, *, upper: float | None = None) -> float:
        """A finite positive number (at most ``upper``)."""
        value = self.get(name, default)
        return _number(self.where, name, value, upper)

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self.where}: {name}={value!r} must be true or false")
        return value

    def fail(self, name: str, value, supported: str):
        raise ValueError(f"{self.where}: {name}={value!r} is not supported; supported: {supported}")


def _number(where: str, name: str, value, upper: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value > 0 and (upper is None or value <= upper)
    if not ok:
        bound = f" and at most {upper}" if upper is not None else ""
        raise ValueError(f"{where}: {name}={value!r} must be a finite positive number{bound}")
    return float(value)


def _rope(fields: _Fields) -> dict:
    """theta, scaling and partial rotary factor from either config layout."""
    params = fields.get("rope_parameters") or {}
    scaling = fields.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        fields.fail("rope_scaling", scaling or params, "a JSON object or null")
    merged = {**params, **scaling}
    theta = fields.number("rope_theta", merged.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if not isinstance(kind, str):
        fields.fail("rope_scaling.rope_type", kind, "default (none), llama3")
    # the top-level field (hub layout), else rope_parameters' (transformers 5), else the
    # class default: a default must not hide the value rope_parameters gives
    partial = fields.config.get("partial_rotary_factor")
    if partial is None:
        partial = merged.get("partial_rotary_factor")
    if partial is None:
        partial = fields.get("partial_rotary_factor", 1.0)
    partial = _number(fields.where, "partial_rotary_factor", partial, upper=1.0)
    out = {"rotary_base": theta, "rotary_percent": partial}
    if kind == "default":
        return out
    if kind != "llama3":
        name = "rope_scaling" if scaling else "rope_parameters"
        fields.fail(f"{name}.rope_type", kind, "default (none), llama3")
    name = "rope_scaling" if scaling else "rope_parameters"

    def num(key, default):
        return _number(fields.where, f"{name}.{key}", merged.get(key, default))

    original = merged.get("original_max_position_embeddings", 8192)
    if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
        raise ValueError(
            f"{fields.where}: {name}.original_max_position_embeddings="
            f"{original!r} must be a positive integer"
        )
    out.update(
        rope_scaling="llama3",
        rope_scaling_factor=num("factor", 8.0),
        rope_low_freq_factor=num("low_freq_factor", 1.0),
        rope_high_freq_factor=num("high_freq_factor", 4.0),
        rope_original_max_positions=original,
    )
    return out


def _check_sliding_window(fields: _Fields, family: Family, seq_length: int | None) -> None:
    window = fields.count("sliding_window")
    if family.model_type in ("qwen2", "qwen3"):
        # transformers windows layer i when use_sliding_window and i >= max_window_layers
        # (written out as layer_types by transformers 5)
        types = fields.get("layer_types")
        if types:
            sliding = "sliding_attention" in types
        else:
            layers = fields.count("num_hidden_layers", 0)
            first = fields.get("max_window_layers", 28)  # transformers' class default
            if not isinstance(first, int) or isinstance(first, bool) or first < 0:
                raise ValueError(
                    f"{fields.where}: max_window_layers={first!r} must be a non-negative integer"
                )
            sliding = fields.flag("use_sliding_window") and first < layers
        if not sliding:
            return
    if window is None:
        return
    longest = seq_length or fields.count("max_position_embeddings")
    if longest is None or window < longest:
        name = "use_sliding_window" if family.model_type.startswith("qwen") else "sliding_window"
        raise ValueError(
            f"{fields.where}: sliding_window={window} is active for sequences of {longest} "
            f"tokens ({name}); megatron_pd attends to the whole causal prefix: supported only "
            "when the window is null or at least the sequence length (data.seq_length; the "
            "tools' --seq-length)"
        )


def model_config_from_hf(
    config: dict, where: str = CONFIG_FILE, seq_length: int | None = None, vocab_size=None
) -> tuple:
    """(ModelConfig, Family) of an HF config; ``vocab_size`` is the true (tokenizer's) one.

    ``seq_length``, when known, decides whether a sliding window is active.
    """
    family = family_of(config, where)
    fields = _Fields(config, family, where)
    hidden, heads = fields.need("hidden_size"), fields.need("num_attention_heads")
    groups = fields.count("num_key_value_heads", heads)
    if heads % groups:
        raise ValueError(
            f"{where}: num_key_value_heads={groups} must divide num_attention_heads={heads}"
        )
    head_dim = fields.count("head_dim", hidden // heads)
    if head_dim == 0:
        raise ValueError(
            f"{where}: hidden_size={hidden} is smaller than "
            f"num_attention_heads={heads} (and head_dim is not given)"
        )
    act = fields.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        fields.fail("hidden_act", act, ", ".join(_ACTIVATIONS))
    attention_bias = fields.flag("attention_bias")
    qkv_bias = family.qkv_bias == "always" or (
        family.qkv_bias == "attention_bias" and attention_bias
    )
    if attention_bias and family.o_proj_bias:
        fields.fail("attention_bias", True, "false (a bias on o_proj needs biases everywhere)")
    if fields.flag("mlp_bias"):
        fields.fail("mlp_bias", True, "false")
    if fields.get("pretraining_tp", 1) not in (1, None):
        pass  # a sliced reference matmul in transformers: the same function
    _check_sliding_window(fields, family, seq_length)
    rows = fields.need("vocab_size")
    if vocab_size is not None and vocab_size > rows:
        raise ValueError(
            f"{where}: vocab_size={rows} rows cannot hold the tokenizer's {vocab_size} tokens"
        )
    rope = _rope(fields)
    if not family.interleaved_rope and rope["rotary_percent"] != 1.0:
        fields.fail(
            "partial_rotary_factor", rope["rotary_percent"], f"1.0 for {family.architecture}"
        )
    model = ModelConfig(
        num_layers=fields.need("num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=fields.need("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=int(groups),
        kv_channels=int(head_dim),
        vocab_size=vocab_size if vocab_size is not None else rows,
        padded_vocab_size=rows,
        make_vocab_size_divisible_by=1,
        max_position_embeddings=fields.count("max_position_embeddings"),
        tie_embeddings=fields.flag("tie_word_embeddings"),
        normalization="RMSNorm",
        norm_epsilon=fields.number("rms_norm_eps"),
        activation=_ACTIVATIONS[act],
        position_embedding="rope",
        rotary_interleaved=family.interleaved_rope,
        add_bias_linear=False,
        add_qkv_bias=qkv_bias,
        qk_layernorm=family.qk_norm,
        init_method_std=fields.number("initializer_range", 0.02),
        hf_architecture=family.architecture,
        **rope,
    )
    return model, family


def family_for_model(model: ModelConfig) -> Family:
    """The HF architecture that expresses a ModelConfig exactly (ValueError naming the field):
    ``model.hf_architecture`` when set and able to, else the simplest one."""
    family = _simplest_family(model)
    wanted = model.hf_architecture
    if wanted is None or wanted == family.architecture:
        return family
    if wanted == "MistralForCausalLM" and family.architecture == "LlamaForCausalLM":
        return FAMILIES[wanted]  # Llama's layout without a sliding window
    raise ValueError(
        f"model.hf_architecture={wanted!r} cannot express this model; {family.architecture} does"
    )


def _simplest_family(model: ModelConfig) -> Family:

    def fail(field: str, value, why: str):
        raise ValueError(f"model.{field}={value!r}: no Hugging Face architecture {why}")

    if model.normalization != "RMSNorm":
        fail("normalization", model.normalization, "here has it (supported: RMSNorm)")
    if model.activation not in ("swiglu", "geglu"):
        fail("activation", model.activation, "here has a plain MLP (supported: swiglu, geglu)")
    if model.position_embedding != "rope":
        fail("position_embedding", model.position_embedding, "here (supported: rope)")
    if model.add_bias_linear:
        fail("add_bias_linear", True, "has biases in every linear layer")
    if model.rotary_interleaved:
        if model.qk_layernorm:
            fail("qk_layernorm", True, "combines it with interleaved RoPE")
        if model.rope_scaling != "none":
            fail("rope_scaling", model.rope_scaling, "combines it with interleaved RoPE (GLM)")
        return FAMILIES["GlmForCausalLM"]
    if model.rotary_percent != 1.0:
        fail("rotary_percent", model.rotary_percent, "rotates part of a head in halves")
    if model.qk_layernorm:
        if model.add_qkv_bias:
            fail("add_qkv_bias", True, "combines a QKV bias without o_proj bias with q/k norm")
        return FAMILIES["Qwen3ForCausalLM"]
    if model.add_qkv_bias:
        if model.rope_scaling != "none":
            fail("rope_scaling", model.rope_scaling, "combines it with a QKV bias (Qwen2)")
        return FAMILIES["Qwen2ForCausalLM"]
    return FAMILIES["LlamaForCausalLM"]


def hf_config_for_model(
    model: ModelConfig, rows: int, tokenizer=None, dtype: str = "bfloat16"
) -> dict:
    """config.json for a ModelConfig whose embedding has ``rows`` rows (older layout:
    ``rope_theta`` / ``rope_scaling`` at the top level, which transformers 4 and 5 read)."""
    family = family_for_model(model)
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups,
        "head_dim": model.head_dim,
        "hidden_act": "silu" if model.activation == "swiglu" else "gelu",
        "max_position_embeddings": model.max_position_embeddings or 4096,
        "rms_norm_eps": model.norm_epsilon,
        "vocab_size": rows,
        "tie_word_embeddings": model.tie_embeddings,
        "rope_theta": float(model.rotary_base),
        "rope_scaling": None,
        "initializer_range": model.init_method_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if family.model_type in ("llama", "qwen3", "glm"):
        config["attention_bias"] = bool(model.add_qkv_bias)
    if family.model_type == "llama":
        config["mlp_bias"] = False
    if family.model_type in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=0)
    if family.model_type == "mistral":
        config["sliding_window"] = None
    if family.model_type == "glm":
        config["partial_rotary_factor"] = model.rotary_percent
    if model.rope_scaling == "llama3":
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": model.rope_scaling_factor,
            "low_freq_factor": model.rope_low_freq_factor,
            "high_freq_factor": model.rope_high_freq_factor,
            "original_max_position_embeddings": model.rope_original_max_positions,
        }
    if tokenizer is not None:
        config["eos_token_id"] = tokenizer.eod
        config["bos_token_id"] = tokenizer.bos
        config["pad_token_id"] = getattr(tokenizer, "pad_token_id", None)
    return config
