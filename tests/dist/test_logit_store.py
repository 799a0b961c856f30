"""The offline logits store: dump round trip, byte-identical resumed dump, offline PD equal to
online PD, header mismatches, corrupt shards, and a store recorded during pre-training."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from _runs import (
    TORCHRUN_ENV,
    losses,
    run_args,
    torchrun_command,
    train_error,
    train_in_ranks,
)

from megatron_pd.config import load_config
from megatron_pd.logits.store import StoreReader

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRUNCATION = "top-0.9-12"
# 8-bit uniform quantization of log-probs over [-16, 0]: |error| <= 16 / 255 / 2.
VALUE_TOL = 16.0 / 255 / 2 + 1e-6


def student_args(corpus, run_dir, *extra):
    return run_args(corpus, run_dir, "--model.hidden_size=48", "--model.num_attention_heads=4",
                    "--train.train_steps=4", "--train.eval_interval=2", *extra)


def dump_in_ranks(rank, world_size, args, store, splits, per_shard):
    from megatron_pd.logits.dump import dump_teacher_logits
    from megatron_pd.train import _absolute_paths

    cfg = load_config(None, args)
    _absolute_paths(cfg)
    return dump_teacher_logits(cfg, store, splits, per_shard)


@pytest.fixture(scope="module")
def store(small_corpus, teacher_run, tmp_path_factory):
    """train + valid splits dumped by 2 ranks with the teacher at TP=2 (micro batch 2)."""
    root = str(tmp_path_factory.mktemp("store") / "store")
    args = student_args(small_corpus, root + "_run", f"--distill.teacher.load={teacher_run}",
                        "--distill.teacher.tp=2", f"--distill.truncation={TRUNCATION}")
    summary = run_distributed(dump_in_ranks, 2, args, root, ["train", "valid"], 64)[0]
    return {"dir": root, "summary": summary, "args": args}


def direct_entries(rank, world_size, teacher_run, small_corpus, sample_ids):
    """The teacher's truncated entries computed directly (one rank) for some samples."""
    from megatron_pd.config.loader import load_config as load
    from megatron_pd.data.datasets import SampleIds, build_splits
    from megatron_pd.data.tokenizer import Tokenizer
    from megatron_pd.logits.truncation import TruncationSpec, truncate_vocab_parallel
    from megatron_pd.models.teacher import FrozenTeacher, TeacherSource
    from megatron_pd.parallel import topology
    from megatron_pd.parallel.vocab import VocabInfo

    source = TeacherSource(str(teacher_run))
    groups = topology.init_student_groups(1, 1)
    teacher = FrozenTeacher(load(source.run_config).model, VocabInfo(512, 512, 1, 0), groups,
                            torch.float32, 64)
    source.load_into(teacher)
    cfg = load(None, student_args(small_corpus, "x"))
    splits = build_splits(cfg.data, Tokenizer(small_corpus["tokenizer"]), (32, 8, 0),
                          str(small_corpus["root"] / "cache"))
    ids = SampleIds(splits.train)
    tokens = torch.stack([ids.sample(i)["tokens"] for i in sample_ids])
    logits = teacher.logits(tokens).reshape(-1, 512)
    kept = truncate_vocab_parallel(logits, teacher.vocab, TruncationSpec.parse(TRUNCATION),
                                   dist.group.WORLD)
    return (kept.indices.view(len(sample_ids), 64, -1), kept.logprobs.view(len(sample_ids), 64, -1),
            kept.log_tail.view(len(sample_ids), 64))


def test_round_trip_and_summary(store, teacher_run, small_corpus):
    reader = StoreReader(os.path.join(store["dir"], "train"))
    held = reader.sample_ids()
    samples = [held[0], held[1], held[len(held) // 2], held[-1]]
    expected_ids, expected_logp, expected_tail = run_distributed(
        direct_entries, 1, teacher_run, small_corpus, samples)[0]
    for b, sample in enumerate(samples):
        ids, logp, log_tail = reader.get(sample)
        # the tail mass per token, kept in its own fp16 log field: 2^-11 relative in log r
        want_tail = expected_tail[b].numpy()
        assert np.allclose(log_tail, want_tail, rtol=2.0**-10, atol=0), sample
        for t in range(64):
            want = expected_ids[b, t][expected_ids[b, t] >= 0].numpy()
            order = np.argsort(want)
            got = ids[t][ids[t] >= 0]
            assert np.array_equal(got, want[order]), (sample, t)  # ids exact, ascending
            want_lp = expected_logp[b, t][: len(want)].numpy()[order]
            assert np.abs(logp[t][: len(got)] - want_lp).max() <= VALUE_TOL
            # kept count follows the rule: the smallest prefix reaching p, at most k
            probs = np.sort(np.exp(want_lp))[::-1]
            needed = int((np.cumsum(probs) - probs < 0.9).sum())
            assert len(got) == min(max(needed, 1), 12)
    summary = store["summary"]["train"]
    assert summary["tokens"] == reader.num_samples * 64
    assert 1 <= summary["kept_per_token"] <= 12
    assert summary["value_kl_nats"] < 1e-3
    header = json.load(open(os.path.join(store["dir"], "train", "header.json")))
    assert header["complete"] and header["truncation"]["name"] == TRUNCATION


def test_interrupted_dump_is_byte_identical(store, small_corpus, teacher_run, tmp_path):
    args = store["args"]
    reference = str(tmp_path / "uninterrupted")
    run_distributed(dump_in_ranks, 2, args, reference, ["train"], 2)
    command = torchrun_command(os.path.join(REPO, "tools", "dump_teacher_logits.py"), "--store",
                               str(tmp_path / "resumed"), "--splits", "train",
                               "--samples-per-shard", "2", *args)
    split = tmp_path / "resumed" / "train"
    # Rank 0 dies as it renames its third shard: two shards are complete, whatever the timing.
    killed = subprocess.run(command, env=dict(TORCHRUN_ENV,
                                              MEGATRON_PD_FAULTS="store_shard_write:rank=0:skip=2"),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0, "the fault did not fire"
    assert len(list(split.glob("shard_*.pd"))) >= 2
    assert not json.load(open(split / "header.json"))["complete"]
    done = subprocess.run(command, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(os.listdir(os.path.join(reference, "train")))
    assert names == sorted(os.listdir(split))
    for name in names:
        a = open(os.path.join(reference, "train", name), "rb").read()
        assert a == open(split / name, "rb").read(), name


def offline_vs_online(rank, world_size, args, store_dir, teacher_run):
    """Per-token KD losses and gradients (one SGD step, lr 1) from the store and from the live
    teacher."""
    from _models import gather_global_state

    from megatron_pd.data.datasets import GlobalBatchSampler, SampleIds, build_splits
    from megatron_pd.engine.distill_module import DistillTrainModule
    from megatron_pd.parallel import topology
    from megatron_pd.data.tokenizer import load_tokenizer

    out = {}
    for mode in ("offline", "online"):
        extra = ([f"--distill.store={store_dir}"] if mode == "offline" else
                 [f"--distill.teacher.load={teacher_run}", f"--distill.truncation={TRUNCATION}"])
        cfg = load_config(None, args + extra + ["--parallel.tp=2", "--train.micro_batch_size=4",
                                                "--optimizer.name=sgd",
                                                "--parallel.distributed_optimizer=false",
                                                "--optimizer.weight_decay=0",
                                                "--optimizer.clip_grad=0",
                                                "--distill.loss=forward_kl",
                                                "--distill.alpha.value=0.8",
                                                "--distill.tau.value=2.0"])
        groups = topology.init_student_groups(2, 1)
        tokenizer = load_tokenizer(cfg.data.tokenizer_model)
        splits = build_splits(cfg.data, tokenizer, (32, 8, 0),
                              str(cfg.data.cache_dir))
        ids = SampleIds(splits.train)
        module = DistillTrainModule(cfg, groups, 512, 1, tokenizer.fingerprint,
                                    {"train": ids.fingerprint(),
                                     "valid": SampleIds(splits.valid).fingerprint()})
        sampler = GlobalBatchSampler(8, 4, 1, 0)
        from megatron_pd.data.datasets import microbatches

        batches = [dict(b, split="train") for b in microbatches(splits.train, sampler, 8, ids)]
        module.alpha, module.tau = 0.8, 2.0
        module.capture = []
        module.eval_step(batches)
        kd = torch.cat([c["kd_loss"] for c in module.capture])
        module.capture = None
        before = gather_global_state(module.model)
        module.train_step(batches, lr=1.0, alpha=0.8, tau=2.0)
        grads = {k: before[k] - v for k, v in gather_global_state(module.model).items()}
        out[mode] = (kd, grads)
    return out


def test_offline_pd_equals_online_pd(store, teacher_run):
    # The dump ran with DP=2, micro batch 2; the student here runs TP=2/DP=1, micro batch 4.
    result = run_distributed(offline_vs_online, 2, [a for a in store["args"]
                                                    if "distill" not in a], store["dir"],
                             str(teacher_run))[0]
    kd_off, grads_off = result["offline"]
    kd_on, grads_on = result["online"]
    # The store keeps log-probs to 8 bits: per-token KD agrees to ~1e-3 (KL-scale error).
    torch.testing.assert_close(kd_off, kd_on, rtol=0, atol=5e-3)
    for key, grad in grads_on.items():
        scale = grad.abs().max().item()
        assert (grads_off[key] - grad).abs().max().item() <= 0.02 * scale + 1e-7, key


def test_offline_pd_with_pipeline_parallel_student(store, tmp_path):
    """Student PP=2 (2 ranks) from the store takes the same steps as one rank."""
    base = [a for a in store["args"] if "distill" not in a] + [
        f"--distill.store={store['dir']}",
        "--train.train_steps=3",
        "--train.eval_interval=3",
        "--model.num_layers=2",
    ]
    run_distributed(train_in_ranks, 1, base + [f"--run_dir={tmp_path / 'one'}"])
    run_distributed(
        train_in_ranks, 2, base + ["--parallel.pp=2", f"--run_dir={tmp_path / 'pp2'}"]
    )
    one, pp2 = losses(tmp_path / "one"), losses(tmp_path / "pp2")
    assert [r[:2] for r in one] == [r[:2] for r in pp2] and len(one) == 4
    for (_, _, a), (_, _, b) in zip(one, pp2):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, pp2)


def test_student_cuts_a_narrower_truncation_from_the_store(store, tmp_path):
    """The store holds top-0.9-12; a student asking top-0.8-6 gets exactly that cut, one
    asking for more than was stored gets an error before step 1."""
    from megatron_pd.engine.metrics import read_metrics

    base = [a for a in store["args"] if "distill" not in a] + [f"--distill.store={store['dir']}"]
    run_dir = tmp_path / "narrow"
    run_distributed(train_in_ranks, 1, base + ["--distill.truncation=top-0.8-6",
                                               "--train.train_steps=2", f"--run_dir={run_dir}"])
    rows = read_metrics(str(run_dir / "metrics.jsonl"), "train")
    assert rows and all(1 <= r["kept_per_token"] <= 6 for r in rows)
    error = run_distributed(run_error, 1, base + ["--distill.truncation=top-0.95-12",
                                                  f"--run_dir={tmp_path / 'wide'}"])[0]
    assert "cannot be cut from the store's top-0.9-12 entries: p=0.95 exceeds" in error


def run_error(rank, world_size, args):
    from megatron_pd.train import run

    try:
        run(load_config(None, args))
    except ValueError as err:
        return str(err)
    return None


def test_header_mismatches_are_caught(store, small_corpus, tmp_path):
    base = [a for a in store["args"] if "distill" not in a] + [f"--distill.store={store['dir']}"]
    cases = {
        "--data.seq_length=32": "header.dataset.seq_length is 64 but this run has 32",
        "--data.seed=99": "header.dataset.seed is 1234 but this run has 99",
        "--data.split=80,20,0": "header.dataset.split is '90,10,0' but this run has '80,20,0'",
        "--model.vocab_size=600": "header.vocab_size is 512 but this run has 600",
        "--train.train_steps=400": "header.dataset.fingerprint is",  # other epochs: other samples
    }
    for override, message in cases.items():
        error = run_distributed(run_error, 1, base + [override, f"--run_dir={tmp_path / 'r'}"])
        assert error[0] is not None and message in error[0], (override, error[0])
    other = tmp_path / "other_tokenizer"
    shutil.copytree(store["dir"], other)
    header_path = other / "train" / "header.json"
    header = json.load(open(header_path))
    header["tokenizer_fingerprint"] = "0123456789abcdef"
    json.dump(header, open(header_path, "w"))
    args = [a for a in base if "distill.store" not in a] + [f"--distill.store={other}",
                                                            f"--run_dir={tmp_path / 'r2'}"]
    error = run_distributed(run_error, 1, args)[0]
    assert "header.tokenizer_fingerprint is '0123456789abcdef'" in error


def test_corrupt_or_truncated_shard_is_named(store, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(store["dir"], copy)
    shard = sorted((copy / "valid").glob("shard_*.pd"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the last sample's block
    shard.write_bytes(bytes(data))
    reader = StoreReader(str(copy / "valid"))
    last = int(reader._shards[0].sample_ids[-1])
    with pytest.raises(ValueError, match=f"{shard.name}: sample {last} is corrupt"):
        reader.get(last)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=f"shard file .*{shard.name} is truncated"):
        StoreReader(str(copy / "valid"))


def test_store_recorded_during_pretraining(small_corpus, store, tmp_path):
    dumped = store["dir"]
    store = tmp_path / "recorded"
    teacher = tmp_path / "teacher"
    args = run_args(small_corpus, teacher, "--train.train_steps=4", "--train.eval_interval=0",
                    "--checkpoint.save_interval=2", f"--train.record_logits={store}",
                    "--train.record_truncation=top-0.95-16")
    run_distributed(train_in_ranks, 2, args)
    reader = StoreReader(str(store / "train"))
    assert reader.header.source == "pretraining"
    assert reader.num_samples == 4 * 8  # every trained sample, once
    steps = sorted({reader.step_of(s) for s in reader._where})
    assert steps == [1, 2, 3, 4]
    ids, logp, _ = reader.get(next(iter(reader._where)))
    assert ((ids >= 0).sum(1) >= 1).all() and (logp <= 0).all()
    # A student trains from it (same data, its own layout and batch size).
    student = run_args(small_corpus, tmp_path / "student", "--train.train_steps=4",
                       "--train.micro_batch_size=4", "--train.eval_interval=0",
                       "--model.hidden_size=48", "--model.num_attention_heads=4",
                       f"--distill.store={store}", "--distill.alpha.value=0.5")
    run_distributed(train_in_ranks, 1, student)
    from megatron_pd.engine.metrics import read_metrics

    rows = read_metrics(str(tmp_path / "student" / "metrics.jsonl"), "train")
    assert len(rows) == 4 and all(r["kd_loss"] > 0 for r in rows)
    # The paper's late online logits: only what the teacher recorded at steps 3-4. The
    # student starts at the teacher's step-3 samples and trains 2 steps inside the window.
    late = run_args(small_corpus, tmp_path / "late", "--train.train_steps=2",
                    "--train.micro_batch_size=2", "--train.eval_interval=0",
                    "--model.hidden_size=48", "--model.num_attention_heads=4",
                    f"--distill.store={store}", "--distill.store_steps=[3,4]")
    captured = run_distributed(capture_sample_steps, 2, late, str(store / "train"))
    assert sorted(set().union(*captured)) == [3, 4]
    # One more step would read samples the teacher saw at step 5: an error, not a misalignment.
    too_long = [a if a != "--train.train_steps=2" else "--train.train_steps=3" for a in late]
    with pytest.raises(Exception, match=r"(never recorded|recorded at teacher step \d), "
                                        r"outside distill.store_steps=\[3, 4\]"):
        run_distributed(train_in_ranks, 1, too_long + [f"--run_dir={tmp_path / 'late2'}"])
    # A dumped store has no training steps.
    with pytest.raises(Exception, match="was not recorded during a pre-training run"):
        run_distributed(train_in_ranks, 1, run_args(
            small_corpus, tmp_path / "late3", "--train.train_steps=1",
            f"--distill.store={dumped}", "--distill.store_steps=[1,1]"))


def capture_sample_steps(rank, world_size, args, split_dir):
    """Train, and return the recorded teacher step of every sample this rank trained on."""
    import megatron_pd.engine.distill_module as module

    reader = StoreReader(split_dir)
    seen = set()
    original = module.DistillTrainModule._store_payload

    def spy(self, batch):
        if batch.get("split") == "train":
            seen.update(reader.step_of(s) for s in batch["sample_ids"].tolist())
        return original(self, batch)

    module.DistillTrainModule._store_payload = spy
    train_in_ranks(rank, world_size, args)
    return seen


def test_dry_run_describes_the_store(store, tmp_path, capsys):
    from megatron_pd.train import main

    base = [a for a in store["args"] if "distill" not in a] + ["--dry-run", "--world-size=2"]
    assert main(base + [f"--distill.store={store['dir']}"]) == 0
    out = capsys.readouterr().out
    assert f"logits store {store['dir']}/train: {TRUNCATION} from dump" in out
    assert "dry run OK" in out
    assert main(base + [f"--distill.store={tmp_path}"]) == 2
    assert f"{tmp_path}/train is not a logits store split" in capsys.readouterr().err


def run_samples(rank, world_size, args):
    """The unshuffled ids a run with ``args`` reads: train steps x global batch positions of
    the train split, the validation batches of the valid split."""
    from megatron_pd.data.datasets import build_splits, sample_ids_of
    from megatron_pd.data.tokenizer import load_tokenizer
    from megatron_pd.logits.dump import needed_samples

    cfg = load_config(None, args)
    gbs = cfg.train.global_batch_size
    splits = build_splits(cfg.data, load_tokenizer(cfg.data.tokenizer_model),
                          (cfg.total_steps() * gbs, cfg.train.eval_batches * gbs, 0),
                          cfg.data.cache_dir)
    ids = sample_ids_of(splits)
    return {
        "train": needed_samples(ids["train"], cfg.total_steps() * gbs).tolist(),
        "valid": needed_samples(ids["valid"], cfg.train.eval_batches * gbs).tolist(),
        "fingerprint": ids["train"].fingerprint(),
    }


def test_dump_covers_exactly_the_run_and_extends_without_rewriting(store, tmp_path):
    """A dump holds the samples its run reads, no more; dumping for twice the steps adds a
    segment with only the missing samples (every existing file byte-identical); a student
    reading past a store's samples is an error before step 1 that says how to extend it."""
    wanted = run_distributed(run_samples, 1, store["args"])[0]
    for split in ("train", "valid"):
        assert StoreReader(os.path.join(store["dir"], split)).sample_ids() == wanted[split]
    longer = store["args"] + ["--train.train_steps=8"]
    wanted_longer = run_distributed(run_samples, 1, longer)[0]
    assert wanted_longer["fingerprint"] == wanted["fingerprint"]  # the same samples, more
    assert set(wanted["train"]) < set(wanted_longer["train"])

    copy = str(tmp_path / "store")
    shutil.copytree(store["dir"], copy)
    before = {p: open(os.path.join(copy, "train", p), "rb").read()
              for p in os.listdir(os.path.join(copy, "train")) if p.startswith("shard_")}
    student = student_args_of(longer, copy, tmp_path / "short")
    error = run_distributed(train_error, 1, student)[0]
    assert "reads 64 of the train split" in error and "extend the store" in error, error

    run_distributed(dump_in_ranks, 2, longer, copy, ["train", "valid"], 64)
    train = os.path.join(copy, "train")
    for name, data in before.items():
        assert open(os.path.join(train, name), "rb").read() == data, name
    header = json.load(open(os.path.join(train, "header.json")))
    assert header["complete"] and [s["complete"] for s in header["segments"]] == [True, True]
    assert header["segments"][1]["samples"] == len(wanted_longer["train"]) - len(wanted["train"])
    assert StoreReader(train).sample_ids() == wanted_longer["train"]
    assert run_distributed(train_error, 1, student)[0] is None  # now it trains


def student_args_of(dump_args, store_dir, run_dir):
    """A student's training args from a dump's: the store instead of the live teacher."""
    args = [a for a in dump_args if not a.startswith(("--distill.teacher", "--run_dir"))]
    return args + [f"--distill.store={store_dir}", f"--run_dir={run_dir}"]


