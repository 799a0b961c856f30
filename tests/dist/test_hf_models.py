"""Hugging Face teachers load directly: megatron_pd logits equal transformers' logits.

For every supported family (tests/_hf.py: Llama 2/3 style, Llama-3.1 RoPE scaling, Llama-3.2
tied embeddings, Qwen2 QKV bias, Qwen3 q/k norm and explicit head_dim, Mistral, GLM-4 partial
interleaved RoPE with fused gate_up) a tiny random model with a large initializer_range, random
norms and biases, and an embedding padded past the tokenizer, loaded from its safetensors by
each rank's own slices at TP=1, TP=2 and PP=2, gives transformers' fp32 logits. Negative
controls show the comparison is sharp (a wrong RoPE style or scaling is far off), hub-style
config.json files (rope_theta / rope_scaling at the top level) read the same, and bad input is
a clear error naming the file or field.
"""

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

import _hf  # noqa: E402
from _dist import run_distributed  # noqa: E402

# fp32 on both sides, the same math in another order (fused QKV matmul, megatron's attention
# kernel, vocab-parallel output): ~1e-5 on logits of magnitude ~7; a wrong layout is > 1e-1.
LOGITS_ATOL = 5e-5


def megatron_logits(rank, world_size, model_dirs, tokens, tp, pp, overrides=None):
    """Full-vocabulary logits of each model on this rank's last stage (None elsewhere)."""
    import torch.distributed as dist

    from megatron_pd.config.schema import TeacherConfig
    from megatron_pd.data.tokenizer import load_tokenizer
    from megatron_pd.models.teacher import open_teacher
    from megatron_pd.parallel import topology
    from megatron_pd.parallel.collectives import all_gather_stacked

    groups = topology.init_student_groups(tp, pp)
    out = []
    for model_dir in model_dirs:
        tokenizer = load_tokenizer(model_dir)
        teacher, _ = open_teacher(
            TeacherConfig(load=model_dir, tp=tp, pp=pp, precision="fp32"), groups,
            tokenizer.vocab_size, tokenizer.fingerprint, tokens.shape[1], dist.get_rank(groups.tp))
        if overrides:
            for name, value in overrides.items():
                setattr(teacher.model.rotary_pos_emb, name, value)
        logits = teacher.logits(tokens)
        out.append(None if logits is None
                   else torch.cat(list(all_gather_stacked(logits.contiguous(), groups.tp)), -1))
    return out


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_logits_equal_transformers(hf_models, tp, pp):
    families = list(hf_models["models"])
    dirs = [hf_models["models"][f] for f in families]
    per_rank = run_distributed(megatron_logits, tp * pp, dirs, hf_models["tokens"], tp, pp)
    for rank_out in per_rank:
        for family, actual in zip(families, rank_out):
            if actual is None:
                continue  # not the last pipeline stage
            expected = hf_models["expected"][family]
            assert actual.shape == expected.shape, family
            torch.testing.assert_close(actual, expected, rtol=0, atol=LOGITS_ATOL,
                                       msg=lambda m, f=family: f"{f} tp={tp} pp={pp}: {m}")


def test_the_comparison_is_sharp(hf_models):
    """A wrong RoPE (interleaved for GLM turned off; Llama-3.1 scaling dropped) is far off."""
    models = hf_models["models"]
    glm = run_distributed(megatron_logits, 1, [models["glm"]], hf_models["tokens"], 1, 1,
                          {"rotary_interleaved": False})[0][0]
    assert (glm - hf_models["expected"]["glm"]).abs().max() > 1e-1
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    unscaled = run_distributed(megatron_logits, 1, [models["llama3.1"]], hf_models["tokens"], 1,
                               1, {"inv_freq": base})[0][0]
    assert (unscaled - hf_models["expected"]["llama3.1"]).abs().max() > 1e-1


def test_hub_style_config_reads_the_same(hf_models, tmp_path):
    """config.json as checkpoints on the hub carry it (rope_theta, rope_scaling and
    partial_rotary_factor at the top level) gives the same model."""
    from megatron_pd.models.hf_config import model_config_from_hf, read_hf_config

    for family in ("llama3.1", "glm", "qwen3"):
        copy = tmp_path / family
        shutil.copytree(hf_models["models"][family], copy)
        _hf.legacy_config(str(copy))
        new, _ = model_config_from_hf(read_hf_config(hf_models["models"][family]))
        old, _ = model_config_from_hf(read_hf_config(str(copy)))
        assert new == old, family
        raw = json.loads((copy / "config.json").read_text())
        assert "rope_parameters" not in raw and "rope_theta" in raw
    actual = run_distributed(megatron_logits, 1, [str(tmp_path / "glm")], hf_models["tokens"],
                             1, 1)[0][0]
    torch.testing.assert_close(actual, hf_models["expected"]["glm"], rtol=0, atol=LOGITS_ATOL)


def config_error(rank, world_size, model_dir, student_tokenizer=None, seq_length=40):
    import torch.distributed as dist

    from megatron_pd.config.schema import TeacherConfig
    from megatron_pd.data.tokenizer import load_tokenizer
    from megatron_pd.models.teacher import open_teacher
    from megatron_pd.parallel import topology

    tokenizer = load_tokenizer(student_tokenizer or model_dir)
    groups = topology.init_student_groups(1, 1)
    try:
        open_teacher(TeacherConfig(load=model_dir, precision="fp32"), groups,
                     tokenizer.vocab_size, tokenizer.fingerprint, seq_length,
                     dist.get_rank(groups.tp))
    except ValueError as err:
        return str(err)
    return None


def _edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


def test_bad_hf_teachers_are_clear_errors(hf_models, tmp_path):
    llama = hf_models["models"]["llama"]

    def copy(name):
        target = tmp_path / name
        shutil.copytree(llama, target)
        return target

    cases = {}
    unknown = copy("unknown")
    _edit_config(unknown, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    cases[unknown] = "architectures='GPTNeoXForCausalLM' is not supported; supported: Llama"
    rope = copy("rope")
    _edit_config(rope, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    cases[rope] = "rope_parameters.rope_type='yarn' is not supported; supported: default"
    act = copy("act")
    _edit_config(act, hidden_act="gelu_pytorch_tanh")
    cases[act] = "hidden_act='gelu_pytorch_tanh' is not supported"
    window = tmp_path / "mistral"
    shutil.copytree(hf_models["models"]["mistral"], window)
    _edit_config(window, sliding_window=16)
    cases[window] = "sliding_window=16 is active for sequences of 40 tokens"
    shape = copy("shape")
    _edit_config(shape, intermediate_size=80)
    cases[shape] = "tensor model.layers.0.mlp.down_proj.weight has shape [64, 96], config.json " \
                   "implies [64, 80]"
    truncated = copy("truncated")
    weights = truncated / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    cases[truncated] = "model.safetensors cannot be read"
    pickled = copy("pickled")
    os.remove(pickled / "model.safetensors")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    cases[pickled] = "holds only pickle checkpoints (pytorch_model.bin)"
    sharded = copy("sharded")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    cases[sharded] = "names shard model-00001-of-00002.safetensors, which is missing"
    for path, expected in cases.items():
        message = run_distributed(config_error, 1, str(path))[0]
        assert message is not None and expected in message, (path.name, message)
    # a student whose tokenizer is another one than the teacher ships
    other = tmp_path / "other_tokenizer"
    from megatron_pd.data.corpus import stdlib_corpus_files
    from megatron_pd.data.tokenizer import train_hf_bpe

    train_hf_bpe(stdlib_corpus_files()[10:14], str(other), vocab_size=_hf.TOKENS)
    message = run_distributed(config_error, 1, llama, str(other))[0]
    assert message is not None and "must share one tokenizer" in message, message
