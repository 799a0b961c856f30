"""Models out: HF -> megatron_pd -> HF is exact, exports load in transformers, evaluation and
lm-eval scores equal transformers'.

* hf-to-megatron then megatron-to-hf reproduces every original tensor exactly (fp32 kept as
  fp32), and the export gives transformers' logits; the converted run directory loads as a
  teacher at TP=2 and PP=2 with transformers' logits;
* a student trained here (native checkpoint, optimizer and all) exports to an HF directory
  whose transformers logits equal megatron_pd's;
* ``megatron_pd.evaluate`` on an HF directory (TP=1, TP=2), on its conversion and on the
  export of that conversion equals the loss transformers computes on the same tokens;
* lm-eval on a local task: the ``megatron_pd`` backend on the run directory and lm-eval's
  ``hf`` backend on its export score every request alike.
"""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

import _hf  # noqa: E402
from _dist import run_distributed  # noqa: E402

# The same tensors in transformers: equal exactly. megatron_pd vs transformers, fp32, the same
# math in another order: ~1e-5 on logits of magnitude ~7 (see test_hf_models).
LOGITS_ATOL = 5e-5
# The per-token loss, averaged over ~700 tokens: fp32 log-softmax rounding.
LOSS_ATOL = 2e-5


def convert(rank, world_size, hf_dir, run_dir, keep_layers=None):
    from megatron_pd.models.convert import import_hf

    return import_hf(hf_dir, run_dir, keep_layers=keep_layers)


def export(rank, world_size, load, out_dir, dtype):
    from megatron_pd.models.convert import export_hf

    return export_hf(load, out_dir, dtype=dtype, shard_bytes=40_000)


def test_round_trip_is_exact(hf_models, tmp_path):
    from safetensors.torch import load_file

    for family, hf_dir in hf_models["models"].items():
        run_dir, back = tmp_path / f"{family}_run", tmp_path / f"{family}_back"
        run_distributed(convert, 1, hf_dir, str(run_dir))
        summary = run_distributed(export, 1, str(run_dir), str(back), "float32")[0]
        assert len(summary["files"]) > 1  # 40 kB shards: the index is written and read
        original = load_file(os.path.join(hf_dir, "model.safetensors"))
        index = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(index) == set(original), family
        for name, tensor in original.items():
            exported = load_file(str(back / index[name]))[name]
            assert torch.equal(exported, tensor), (family, name)
        actual = _hf.hf_logits(str(back), hf_models["tokens"])
        assert torch.equal(actual, hf_models["expected"][family]), family
        config = json.loads((back / "config.json").read_text())
        assert config["architectures"] == json.loads(
            open(os.path.join(hf_dir, "config.json")).read())["architectures"]


def teacher_logits(rank, world_size, load, tokens, tp, pp):
    import torch.distributed as dist

    from megatron_pd.evaluate import open_model
    from megatron_pd.parallel.collectives import all_gather_stacked

    teacher, _, vocab = open_model(load, None, tp, pp, "fp32", tokens.shape[1])
    logits = teacher.logits(tokens)
    if logits is None:
        return None
    full = torch.cat(list(all_gather_stacked(logits.contiguous(), teacher.groups.tp)), -1)
    assert dist.get_world_size() == tp * pp
    return full[..., : vocab.true_size]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_converted_run_loads_at_any_layout(hf_models, tmp_path, tp, pp):
    for family in ("glm", "qwen3", "llama3.2-tied"):
        run_dir = tmp_path / family
        run_distributed(convert, 1, hf_models["models"][family], str(run_dir))
        results = run_distributed(teacher_logits, tp * pp, str(run_dir), hf_models["tokens"],
                                  tp, pp)
        actual = [r for r in results if r is not None][0]
        torch.testing.assert_close(actual, hf_models["expected"][family], rtol=0,
                                   atol=LOGITS_ATOL, msg=lambda m, f=family: f"{f}: {m}")


def test_pruned_import_keeps_the_chosen_layers(hf_models, tmp_path):
    from safetensors.torch import load_file

    run_dir, back = tmp_path / "pruned", tmp_path / "pruned_hf"
    run_distributed(convert, 1, hf_models["models"]["qwen2"], str(run_dir), [1])
    run_distributed(export, 1, str(run_dir), str(back), "float32")
    original = load_file(os.path.join(hf_models["models"]["qwen2"], "model.safetensors"))
    index = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((back / "config.json").read_text())["num_hidden_layers"] == 1
    for name in index:
        source = name.replace("model.layers.0.", "model.layers.1.")
        assert torch.equal(load_file(str(back / index[name]))[name], original[source]), name


def native_student(rank, world_size, run_dir, tokenizer_dir):
    """A student trained here: a few SGD steps of a tiny model, saved as training saves it."""
    from megatron_pd.config import load_config
    from megatron_pd.config.loader import save_config
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.models.checkpoint import CheckpointManager
    from megatron_pd.parallel import topology

    cfg = load_config(None, [
        "--model.num_layers=2", "--model.hidden_size=64", "--model.ffn_hidden_size=96",
        "--model.num_attention_heads=4", "--model.num_query_groups=2",
        "--model.make_vocab_size_divisible_by=64", "--model.init_method_std=0.2",
        "--model.tie_embeddings=true", "--data.seq_length=40", "--train.precision=fp32",
        f"--data.tokenizer_model={tokenizer_dir}", f"--run_dir={run_dir}",
        "--model.rotary_base=50000"])
    module = TrainModule(cfg, topology.init_student_groups(1, 1), _hf.TOKENS, 1)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    CheckpointManager(os.path.join(run_dir, "checkpoints")).save(module, 3, {"step": 3})
    return module.vocab.padded_size


def test_export_of_a_native_student_loads_in_transformers(hf_models, tmp_path):
    run_dir, out = tmp_path / "student", tmp_path / "student_hf"
    padded = run_distributed(native_student, 1, str(run_dir), hf_models["tokenizer"])[0]
    assert padded > _hf.TOKENS  # megatron's padding rows exist and are dropped by the export
    summary = run_distributed(export, 1, str(run_dir), str(out), "float32")[0]
    assert summary["rows"] == _hf.TOKENS
    ours = run_distributed(teacher_logits, 1, str(run_dir), hf_models["tokens"], 1, 1)[0]
    theirs = _hf.hf_logits(str(out), hf_models["tokens"])
    assert theirs.shape[-1] == _hf.TOKENS
    torch.testing.assert_close(ours, theirs, rtol=0, atol=LOGITS_ATOL)


def test_inexpressible_student_is_an_error():
    from megatron_pd.config.schema import ModelConfig
    from megatron_pd.models.hf_config import family_for_model

    with pytest.raises(ValueError, match="model.normalization='LayerNorm': no Hugging Face"):
        family_for_model(ModelConfig(normalization="LayerNorm"))
    with pytest.raises(ValueError, match="model.activation='gelu'"):
        family_for_model(ModelConfig(activation="gelu"))
    with pytest.raises(ValueError, match="model.rotary_percent=0.5"):
        family_for_model(ModelConfig(rotary_percent=0.5))
    assert family_for_model(ModelConfig(rotary_percent=0.5, rotary_interleaved=True,
                                        add_qkv_bias=True)).architecture == "GlmForCausalLM"
    assert family_for_model(ModelConfig(qk_layernorm=True)).architecture == "Qwen3ForCausalLM"


def evaluate_in_ranks(rank, world_size, load, documents, tp):
    from types import SimpleNamespace

    from megatron_pd.evaluate import evaluate

    args = SimpleNamespace(load=load, input=documents, tokenizer=None, seq_length=48, tp=tp,
                           pp=1, batch_size=3, precision="fp32", json_key="text",
                           max_documents=None, json=None)
    return evaluate(args)


def transformers_loss(model_dir, documents):
    import transformers

    from megatron_pd.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for line in open(documents):
            ids = tokenizer.encode_document(json.loads(line)["text"])[:48]
            logits = model(torch.tensor([ids])).logits[0]
            losses = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]),
                                                       reduction="sum")
            total, count = total + losses.item(), count + len(ids) - 1
    return total / count, count


def test_evaluate_equals_transformers(hf_models, tmp_path):
    from megatron_pd.data.corpus import stdlib_corpus_files

    documents = tmp_path / "held_out.jsonl"
    with open(documents, "w") as f:
        for path in stdlib_corpus_files()[300:310]:
            f.write(json.dumps({"text": open(path, errors="replace").read()[:2000]}) + "\n")
    hf_dir = hf_models["models"]["qwen2"]
    expected, tokens = transformers_loss(hf_dir, documents)
    run_dir, back = tmp_path / "run", tmp_path / "back"
    run_distributed(convert, 1, hf_dir, str(run_dir))
    run_distributed(export, 1, str(run_dir), str(back), "float32")
    for load, tp in ((hf_dir, 1), (hf_dir, 2), (str(run_dir), 2), (str(back), 1)):
        result = run_distributed(evaluate_in_ranks, tp, load, str(documents), tp)[0]
        assert result["tokens"] == tokens
        assert abs(result["nll_per_token"] - expected) < LOSS_ATOL, (load, tp, result, expected)


def test_lm_eval_backend_equals_the_hf_backend(hf_models, tmp_path):
    """The same local multiple-choice task scored by lm-eval's hf backend on an export and by
    the megatron_pd backend on the run directory it came from."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import subprocess
    import sys

    from megatron_pd.data.corpus import stdlib_corpus_files

    run_dir, back = tmp_path / "run", tmp_path / "back"
    run_distributed(convert, 1, hf_models["models"]["llama3.1"], str(run_dir))
    run_distributed(export, 1, str(run_dir), str(back), "float32")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    names = sorted({os.path.basename(p)[:-3] for p in stdlib_corpus_files()[:400]})
    with open(task_dir / "mc.jsonl", "w") as f:
        for i in range(0, 48, 4):
            f.write(json.dumps({"query": "import", "choices": [" " + n for n in names[i:i + 4]],
                                "label": i % 4}) + "\n")
    (task_dir / "stdlib_mc.yaml").write_text(
        "task: stdlib_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {task_dir / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results = {}
    for name, command in (
        ("hf", [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                f"pretrained={back},dtype=float32", "--device", "cpu"]),
        ("megatron_pd", [sys.executable, "-m", "megatron_pd.harness", "--model", "megatron_pd",
                         "--model_args", f"load={run_dir}"]),
    ):
        out = tmp_path / f"out_{name}"
        subprocess.run(command + ["--tasks", "stdlib_mc", "--include_path", str(task_dir),
                                  "--batch_size", "4", "--output_path", str(out),
                                  "--log_samples"], check=True, env=env, capture_output=True,
                       timeout=600)
        samples = sorted(out.rglob("samples_stdlib_mc*.jsonl"))[-1]
        results[name] = [json.loads(line) for line in open(samples)]
    assert len(results["hf"]) == len(results["megatron_pd"]) == 12
    for a, b in zip(results["hf"], results["megatron_pd"]):
        assert a["acc"] == b["acc"]
        for x, y in zip(a["resps"], b["resps"]):
            assert abs(float(x[0][0]) - float(y[0][0])) < 1e-3


def test_odd_vocabulary_rows_convert_to_any_tp_and_back(hf_models, tmp_path):
    """An HF embedding of 301 rows (odd) is padded with zero rows in the converted checkpoint,
    which then loads at TP=2 with transformers' logits; the export (default dtype: the
    checkpoint's own) gives back exactly the 301-row tensors."""
    from safetensors.torch import load_file

    hf_dir = str(tmp_path / "odd")
    _hf.build_model("qwen3", hf_dir, hf_models["tokenizer"], vocab_size=301)
    expected = _hf.hf_logits(hf_dir, hf_models["tokens"])
    run_dir, back = tmp_path / "odd_run", tmp_path / "odd_back"
    run_distributed(convert, 1, hf_dir, str(run_dir))
    results = run_distributed(teacher_logits, 2, str(run_dir), hf_models["tokens"], 2, 1)
    torch.testing.assert_close(results[0], expected, rtol=0, atol=LOGITS_ATOL)
    summary = run_distributed(export, 1, str(run_dir), str(back), None)[0]
    assert summary["rows"] == 301
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    index = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
    for name, tensor in original.items():
        assert torch.equal(load_file(str(back / index[name]))[name], tensor), name
    assert json.loads((back / "config.json").read_text())["vocab_size"] == 301


def test_a_tensor_of_the_wrong_shape_is_named_before_anything_is_written(hf_models, tmp_path):
    import subprocess
    import sys

    hf_dir = tmp_path / "wrong"
    _hf.build_model("llama", str(hf_dir), hf_models["tokenizer"])
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 80  # the tensors hold 96
    (hf_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "wrong_run"
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_checkpoint.py")
    done = subprocess.run(
        [sys.executable, tool, "hf-to-megatron", "--hf", str(hf_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "down_proj.weight has shape [64, 96], config.json implies [64, 80]" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists() or not any((out / "checkpoints").glob(".*tmp"))
