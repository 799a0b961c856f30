"""Tiny Hugging Face models and tokenizers built locally (no hub): one per supported family.

Each model is a transformers config class with random weights - a large ``initializer_range``
and random norm weights and biases (transformers initialises those to ones/zeros, which would
hide a wrong norm or bias mapping) - saved with ``save_pretrained`` as safetensors next to a
byte-level BPE tokenizer trained on a few stdlib files. The embedding has more rows (320) than
the tokenizer has tokens (300), as real checkpoints often do.
"""

from __future__ import annotations

import json
import os

import torch

TOKENS, ROWS = 300, 320
COMMON = dict(
    vocab_size=ROWS,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,
    rms_norm_eps=1e-5,
    eos_token_id=0,
    bos_token_id=None,
    pad_token_id=None,
)
# family -> (config class, extra fields); head_dim differs from hidden/heads where the
# family has an explicit one, so a wrong head_dim shows.
FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3.1": (
        "LlamaConfig",
        dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama3.2-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500000.0)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, rope_theta=1000000.0)),
    "mistral": ("MistralConfig", dict(sliding_window=None, rope_theta=1000000.0)),
    # a factor other than GlmConfig's default 0.5, so a default that hides it shows
    "glm": ("GlmConfig", dict(head_dim=24, partial_rotary_factor=0.25, attention_bias=True)),
}


def train_tokenizer(out_dir: str) -> str:
    from megatron_pd.data.corpus import stdlib_corpus_files
    from megatron_pd.data.tokenizer import train_hf_bpe

    return train_hf_bpe(stdlib_corpus_files()[:6], out_dir, vocab_size=TOKENS)


def build_model(family: str, out_dir: str, tokenizer_dir: str, seed: int = 0, **overrides):
    """Save a tiny random ``family`` model (+ the tokenizer files) to ``out_dir``; returns it."""
    import shutil

    import transformers

    class_name, extra = FAMILIES[family]
    fields = dict(COMMON, **extra, **overrides)
    # transformers 5 keeps RoPE settings in rope_parameters; older files keep them top level
    rope = {"rope_type": "default", "rope_theta": fields.pop("rope_theta", 10000.0)}
    rope.update(fields.pop("rope_scaling", {}) or {})
    if "partial_rotary_factor" in fields:
        rope["partial_rotary_factor"] = fields.pop("partial_rotary_factor")
    fields["rope_parameters"] = rope
    config = getattr(transformers, class_name)(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if "norm" in name else 0.0))
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    return model


def legacy_config(model_dir: str) -> None:
    """Rewrite config.json in the layout of hub checkpoints (rope_theta / rope_scaling /
    partial_rotary_factor at the top level, as transformers 4 wrote them)."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters", {}) or {}
    config["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type", "default")
    config["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **rope}
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def hf_logits(model_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    with torch.no_grad():
        return model(tokens).logits
