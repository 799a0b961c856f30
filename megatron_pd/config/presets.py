"""Named model shapes: the paper's students, its GLM-4-9B teacher, Llama-style models, tiny CPU.

A preset is a dict of ``ModelConfig`` fields; ``model.preset: NAME`` uses it as defaults that
the other ``model.*`` fields override. The paper's students (PAPER.md, main-experiment table)
use the GLM-4 tokenizer (151,552 tokens), GQA with 2 or 8 key/value groups, RMSNorm, SwiGLU
and RoPE.
"""

from __future__ import annotations

GLM4_VOCAB = 151_552
LLAMA3_VOCAB = 128_256

_GLM_STYLE = dict(
    normalization="RMSNorm",
    activation="swiglu",
    position_embedding="rope",
    vocab_size=GLM4_VOCAB,
    max_position_embeddings=4096,
)


def _student(hidden, ffn, layers, heads, groups, tied):
    return dict(
        _GLM_STYLE,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_layers=layers,
        num_attention_heads=heads,
        num_query_groups=groups,
        tie_embeddings=tied,
    )


MODEL_PRESETS: dict = {
    # The paper's students (hidden, FFN, layers, heads, query groups, tied embeddings).
    "student-330m": _student(1024, 4096, 12, 16, 2, True),
    "student-670m": _student(1024, 4096, 24, 16, 2, False),
    "student-1.9b": _student(2048, 6912, 24, 16, 2, False),
    "student-3.8b": _student(3072, 8192, 28, 24, 8, False),
    "student-6.8b": _student(4096, 12800, 28, 32, 8, False),
    # GLM-4-9B: 40 layers, 32 heads with 2 KV groups, QKV bias, half of each head rotated.
    "glm4-9b": dict(
        _GLM_STYLE,
        hidden_size=4096,
        ffn_hidden_size=13696,
        num_layers=40,
        num_attention_heads=32,
        num_query_groups=2,
        tie_embeddings=False,
        add_qkv_bias=True,
        rotary_percent=0.5,
        rotary_interleaved=True,
        norm_epsilon=1.5625e-07,
        max_position_embeddings=8192,
    ),
    # Llama-3 shapes (RoPE theta 500k; Llama-3.2-1B's long-context RoPE scaling is not modelled).
    "llama3-1b": dict(
        hidden_size=2048,
        ffn_hidden_size=8192,
        num_layers=16,
        num_attention_heads=32,
        num_query_groups=8,
        tie_embeddings=True,
        vocab_size=LLAMA3_VOCAB,
        rotary_base=500_000,
        max_position_embeddings=8192,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_layers=32,
        num_attention_heads=32,
        num_query_groups=8,
        tie_embeddings=False,
        vocab_size=LLAMA3_VOCAB,
        rotary_base=500_000,
        max_position_embeddings=8192,
    ),
    # CPU-sized models for tests and the quickstart (vocabulary from the tokenizer).
    "tiny": dict(
        hidden_size=64,
        ffn_hidden_size=176,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        tie_embeddings=True,
    ),
    "tiny-student": dict(
        hidden_size=96,
        ffn_hidden_size=256,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        tie_embeddings=True,
    ),
    "tiny-teacher": dict(
        hidden_size=192,
        ffn_hidden_size=512,
        num_layers=4,
        num_attention_heads=8,
        num_query_groups=4,
        tie_embeddings=False,
    ),
}


# The paper's distillation settings (PAPER.md). pd_star's alpha follows the learning rate's
# WSD phases: 0 -> 0.9 during the LR warmup, 0.9 while the LR holds, back to 0 while it decays
# (the paper leaves the ends open; these are our documented defaults). Its recipe also needs
# lr_schedule.style=wsd.
DISTILL_PRESETS: dict = {
    "vanilla_pd": dict(
        loss="soft_ce",
        truncation="top-0.95-100",
        tau=dict(style="constant", value=1.0, initial=1.0, final=1.0),
        alpha=dict(style="constant", value=1.0, initial=1.0, final=1.0),
        align_alpha_with_lr=False,
    ),
    "pd_star": dict(
        loss="forward_kl",
        truncation="top-0.95-50",
        tau=dict(style="constant", value=2.0, initial=2.0, final=2.0),
        alpha=dict(style="wsd", value=0.9, initial=0.0, final=0.0),
        align_alpha_with_lr=True,
    ),
}

PRESETS = {"ModelConfig": ("model", MODEL_PRESETS), "DistillConfig": ("distill", DISTILL_PRESETS)}


def preset_fields(name: str, section: str = "ModelConfig") -> dict:
    """The field values of a preset of ``section`` (a deep copy); ValueError naming the
    known presets."""
    import copy

    path, table = PRESETS[section]
    if name not in table:
        known = ", ".join(sorted(table))
        raise ValueError(f"{path}.preset={name!r}: unknown preset (known: {known})")
    return copy.deepcopy(table[name])
