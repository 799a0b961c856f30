"""config.json files as the hub ships them (Llama-2/3.1/3.2, Qwen2.5, Qwen3, Mistral v0.1/v0.3,
GLM-4-9B) read into the ModelConfig that transformers derives from the same file.

The files below are the fields of the published checkpoints' config.json (older layout:
rope_theta / rope_scaling / partial_rotary_factor at the top level, some fields missing so
that class defaults apply). transformers' own config classes are the oracle for head_dim, key/
value heads, RoPE theta and scaling; the GLM-4-9B file must give the glm4-9b preset's shape.
"""

import json

import pytest

from megatron_pd.models.hf_config import model_config_from_hf

LLAMA_2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": 32000,
}
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
LLAMA_32_1B = dict(
    LLAMA_31_8B,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    head_dim=64,
    tie_word_embeddings=True,
    rope_scaling={
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
)
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32768,
}
MISTRAL_7B_V01 = dict(MISTRAL_7B_V03, sliding_window=4096, rope_theta=10000.0, vocab_size=32000)
GLM4_9B = {
    "architectures": ["GlmForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": [151329, 151336, 151338],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 13696,
    "max_position_embeddings": 8192,
    "model_type": "glm",
    "num_attention_heads": 32,
    "num_hidden_layers": 40,
    "num_key_value_heads": 2,
    "pad_token_id": 151329,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1.5625e-07,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 151552,
}
SUPPORTED = {
    "llama-2-7b": LLAMA_2_7B,
    "llama-3.1-8b": LLAMA_31_8B,
    "llama-3.2-1b": LLAMA_32_1B,
    "qwen2.5-7b": QWEN25_7B,
    "qwen3-8b": QWEN3_8B,
    "mistral-7b-v0.3": MISTRAL_7B_V03,
    "glm-4-9b-hf": GLM4_9B,
}


def transformers_view(config: dict, tmp_path):
    """What transformers makes of the same file: (head_dim, kv heads, rope theta, rope params)."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    rope = getattr(hf, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return head_dim, hf.num_key_value_heads, float(theta), rope, hf.tie_word_embeddings


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_hub_configs_read_as_transformers_reads_them(name, tmp_path):
    config = SUPPORTED[name]
    model, family = model_config_from_hf(config, name, seq_length=4096)
    head_dim, groups, theta, rope, tied = transformers_view(config, tmp_path)
    assert family.architecture == config["architectures"][0]
    assert model.head_dim == head_dim and model.query_groups == groups
    assert model.rotary_base == theta and model.tie_embeddings == tied
    assert model.padded_vocab_size == config["vocab_size"]
    assert model.num_layers == config["num_hidden_layers"]
    assert model.ffn_hidden_size == config["intermediate_size"]
    assert model.norm_epsilon == config["rms_norm_eps"]
    if rope.get("rope_type") == "llama3":
        assert model.rope_scaling == "llama3"
        assert model.rope_scaling_factor == rope["factor"]
        assert model.rope_original_max_positions == rope["original_max_position_embeddings"]
    else:
        assert model.rope_scaling == "none"
    partial = rope.get("partial_rotary_factor", 1.0)
    assert model.rotary_percent == partial
    assert model.add_qkv_bias == (name in ("qwen2.5-7b", "glm-4-9b-hf"))
    assert model.qk_layernorm == (name == "qwen3-8b")


def test_glm4_9b_config_is_the_preset():
    from megatron_pd.config.presets import MODEL_PRESETS

    model, _ = model_config_from_hf(GLM4_9B, "glm-4-9b-hf")
    for field, value in MODEL_PRESETS["glm4-9b"].items():
        if field == "vocab_size":
            assert model.padded_vocab_size == value
        elif field == "num_query_groups":
            assert model.query_groups == value
        else:
            assert getattr(model, field) == value, field


def test_mistral_v01_sliding_window_is_an_error():
    with pytest.raises(ValueError, match="sliding_window=4096 is active for sequences of 8192"):
        model_config_from_hf(MISTRAL_7B_V01, "mistral-7b-v0.1", seq_length=8192)
    model, _ = model_config_from_hf(MISTRAL_7B_V01, "mistral-7b-v0.1", seq_length=4096)
    assert model.num_layers == 32  # a window as long as the sequence never cuts attention


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["FalconForCausalLM"]}, "architectures='FalconForCausalLM'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
        ({"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"mlp_bias": True}, "mlp_bias=True is not supported"),
        ({"hidden_size": "4096"}, "hidden_size='4096' must be a positive integer"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ],
)
def test_unsupported_values_name_the_field(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        model_config_from_hf(dict(LLAMA_31_8B, **change), "config.json")


def test_glm_partial_rotary_factor_inside_rope_parameters(tmp_path):
    """transformers 5 writes the factor inside rope_parameters; the class default (0.5) must
    not hide it."""
    config = {k: v for k, v in GLM4_9B.items() if k not in ("partial_rotary_factor", "rope_theta")}
    config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
    }
    model, _ = model_config_from_hf(config, "glm")
    _, _, _, rope, _ = transformers_view(config, tmp_path)
    assert model.rotary_percent == rope["partial_rotary_factor"] == 0.25


@pytest.mark.parametrize(
    "use, first_windowed, active",
    [(False, 0, False), (True, 28, False), (True, 27, True), (True, 0, True)],
)
def test_qwen2_sliding_window_only_where_a_layer_uses_it(use, first_windowed, active, tmp_path):
    """Qwen2 windows layer i when use_sliding_window and i >= max_window_layers (transformers'
    own layer_types is the oracle); a window no layer uses is no error."""
    config = dict(
        QWEN25_7B,
        use_sliding_window=use,
        sliding_window=1024,
        max_window_layers=first_windowed,
    )
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps(config))
    types = transformers.AutoConfig.from_pretrained(str(tmp_path)).layer_types
    assert ("sliding_attention" in types) == active
    if active:
        with pytest.raises(ValueError, match="sliding_window=1024 is active"):
            model_config_from_hf(config, "qwen2", seq_length=4096)
    else:
        assert model_config_from_hf(config, "qwen2", seq_length=4096)[0].num_layers == 28
