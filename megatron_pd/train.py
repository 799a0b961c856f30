"""Pre-train (or distill) a student GPT with megatron-core: the command-line entry point.

    torchrun --nproc_per_node=2 -m megatron_pd.train --config examples/configs/tiny_lm.yaml \
        --parallel.tp=2 --run_dir=runs/tiny_tp2
    python -m megatron_pd.train --config CFG --dry-run --world-size 64   # no GPU needed
    python -m megatron_pd.train --help-config                            # every field

Any config field can be overridden as ``--section.field=value``. The resolved config is written
to ``<run_dir>/config.yaml``; ``--config <run_dir>/config.yaml`` reruns the run exactly (and
resumes it from its latest checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_pd.config.loader import describe_fields, load_config, save_config


def _absolute_paths(cfg) -> None:
    """Make every path of the config absolute, so the saved config reruns from anywhere."""

    def absolute(path):
        return os.path.abspath(path) if path else path

    cfg.run_dir = absolute(cfg.run_dir)
    cfg.data.tokenizer_model = absolute(cfg.data.tokenizer_model)
    cfg.data.cache_dir = absolute(cfg.data.cache_dir)
    cfg.data.blend = [
        item if _is_number(item) else os.path.abspath(item) for item in cfg.data.blend
    ]
    cfg.checkpoint.save_dir = absolute(cfg.checkpoint.save_dir)
    cfg.checkpoint.load_dir = absolute(cfg.checkpoint.load_dir)
    cfg.checkpoint.init_from = absolute(cfg.checkpoint.init_from)
    cfg.distill.teacher.load = absolute(cfg.distill.teacher.load)
    cfg.distill.store = absolute(cfg.distill.store)
    cfg.train.record_logits = absolute(cfg.train.record_logits)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def dry_run(cfg, world_size: int) -> int:
    """Validate config, topology and data files without starting any process group."""
    from megatron_pd.data.datasets import check_data
    from megatron_pd.data.tokenizer import load_tokenizer, resolve_vocab_size
    from megatron_pd.engine.flops import train_flops_per_token
    from megatron_pd.models.gpt import count_parameters
    from megatron_pd.parallel.topology import Layout, describe_layout
    from megatron_pd.parallel.vocab import model_padded_vocab

    dp = cfg.validate_for_world(world_size)
    check_run_dir(cfg, create=False)
    student_layout = Layout(world_size, cfg.parallel.tp, cfg.parallel.pp)
    print(describe_layout(student_layout, "student"))
    if cfg.distill.offline:
        from megatron_pd.logits.store_format import StoreHeader

        for split in ("train", "valid"):
            path = os.path.join(cfg.distill.store, split)
            if split == "valid" and not os.path.isdir(path):
                continue
            header = StoreHeader.read(path)  # names the directory when it is not a store
            print(
                f"logits store {path}: {header.truncation['name']} from "
                f"{header.source}, {header.dataset.get('num_samples')} samples, "
                f"{'complete' if header.complete else 'INCOMPLETE'}; loss {cfg.distill.loss}, "
                f"truncation {cfg.distill.truncation or header.truncation['name']}"
            )
    elif cfg.distill.enabled:
        from megatron_pd.models.teacher import TeacherSource

        teacher = cfg.distill.teacher
        source = TeacherSource(teacher.load)
        shape = source.model_config(teacher, cfg.model.vocab_size, cfg.data.seq_length)
        check_teacher_length(cfg, True, source)
        print(describe_layout(Layout(world_size, teacher.tp, teacher.pp), "teacher"))
        print(
            f"teacher {source.kind} checkpoint {source.checkpoint}: {shape.num_layers} layers, "
            f"hidden "
            f"{shape.hidden_size}; loss {cfg.distill.loss}, exchange "
            f"{cfg.distill.exchange_mode}, truncation {cfg.distill.truncation or 'none'}"
        )
    vocab = cfg.model.vocab_size
    if cfg.data.tokenizer_model and os.path.exists(cfg.data.tokenizer_model):
        tokenizer = load_tokenizer(cfg.data.tokenizer_model)
        vocab = resolve_vocab_size(cfg.model, tokenizer)
        if cfg.data.blend:
            infos = check_data(cfg.data.blend, tokenizer)
            for info in infos:
                print(f"data {info.prefix}: {info.documents} documents, {info.tokens:,} tokens")
    elif cfg.data.tokenizer_model:
        raise ValueError(f"data.tokenizer_model {cfg.data.tokenizer_model} does not exist")
    if vocab:
        padded = model_padded_vocab(cfg.model, vocab, cfg.parallel.tp)
        counts = count_parameters(cfg.model, padded)
        flops = train_flops_per_token(cfg.model, padded, cfg.data.seq_length)
        print(
            f"model: {counts['total'] / 1e6:,.1f}M parameters "
            f"({counts['non_embedding'] / 1e6:,.1f}M non-embedding), vocab {vocab} padded to "
            f"{padded}, {flops / 1e9:.3g} GFLOP per trained token"
        )
    steps = cfg.total_steps()
    tokens = steps * cfg.train.global_batch_size * cfg.data.seq_length
    accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    print(
        f"train: {steps} steps x {cfg.train.global_batch_size} samples x {cfg.data.seq_length} "
        f"tokens = {tokens:,} tokens; {accumulation} micro-batches of "
        f"{cfg.train.micro_batch_size} per rank per step"
    )
    print("dry run OK")
    return 0


def validate(cfg, world_size: int):
    """Every check that needs no process group; returns (tokenizer, true vocab size, dp)."""
    from megatron_pd.data.datasets import check_data
    from megatron_pd.data.tokenizer import load_tokenizer, resolve_vocab_size

    dp = cfg.validate_for_world(world_size)
    check_run_dir(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    vocab_size = resolve_vocab_size(cfg.model, tokenizer)
    check_data(cfg.data.blend, tokenizer)
    check_teacher_length(cfg, int(os.environ.get("RANK", "0")) == 0)
    return tokenizer, vocab_size, dp


def check_teacher_length(cfg, report: bool, source=None) -> None:
    """A student reading longer sequences than its teacher knows: an error past an HF
    model's max_position_embeddings (positions it was never built for), a one-line notice
    past the sequence length a megatron_pd teacher was trained on (it may be meant)."""
    if not cfg.distill.enabled or cfg.distill.offline:
        return
    if source is None:
        from megatron_pd.models.teacher import TeacherSource

        source = TeacherSource(cfg.distill.teacher.load)
    length, where = source.trained_length()
    if length is None or cfg.data.seq_length <= length:
        return
    if source.kind == "hf":
        raise ValueError(
            f"data.seq_length={cfg.data.seq_length} is longer than the teacher's {where} "
            f"({length}): its logits past position {length} would be out of its range"
        )
    if report:
        print(
            f"notice: data.seq_length={cfg.data.seq_length} is longer than the teacher was "
            f"trained on ({where}: {length}); positions past {length} are new to it",
            flush=True,
        )


# what a resumed run must share with the run that wrote the checkpoint (besides the model)
_RESUME_DATA_FIELDS = ("seq_length", "seed", "split")


def check_run_dir(cfg, create: bool = True) -> None:
    """Before anything is written: the run directory is writable, and if it holds a run to
    resume, that run had the same model and data windows (ValueError naming every differing
    field; config.yaml is only written once this passes)."""
    import tempfile

    if create:
        try:
            os.makedirs(cfg.run_dir, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=cfg.run_dir, prefix=".write-test."):
                pass
        except OSError as err:
            raise ValueError(f"run_dir={cfg.run_dir} is not writable ({err.strerror})") from None
    else:  # a dry run writes nothing: the nearest existing directory must let it be made
        existing = os.path.abspath(cfg.run_dir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
            raise ValueError(f"run_dir={cfg.run_dir} is not writable ({existing} is not)")
    saved = os.path.join(cfg.run_dir, "config.yaml")
    save_dir = cfg.checkpoint.save_dir or os.path.join(cfg.run_dir, "checkpoints")
    has_checkpoint = os.path.isfile(os.path.join(save_dir, "latest"))
    if not cfg.checkpoint.resume or not os.path.isfile(saved) or not has_checkpoint:
        return
    from dataclasses import asdict

    previous = load_config(saved)
    before, now = asdict(previous.model), asdict(cfg.model)
    differing = [
        f"model.{k} ({before[k]!r} there, {now[k]!r} here)"
        for k in now
        if k != "transformer_impl" and before.get(k) != now[k]
    ]
    for key in _RESUME_DATA_FIELDS:
        a, b = getattr(previous.data, key), getattr(cfg.data, key)
        if a != b:
            differing.append(f"data.{key} ({a!r} there, {b!r} here)")
    if differing:
        raise ValueError(
            f"run_dir={cfg.run_dir} holds a run with another setup, which this one would "
            f"resume: {'; '.join(differing)}. Use another run_dir (nothing was written)"
        )


def run(cfg) -> dict:
    """Run training in this process (one rank of a torchrun job, or a single process).

    All validation happens before torch.distributed starts, so a bad config or bad data fails
    fast and identically on every rank.
    """
    import torch.distributed as dist

    from megatron_pd.parallel import topology

    _absolute_paths(cfg)
    world_size = (
        dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    )
    tokenizer, vocab_size, dp = validate(cfg, world_size)
    rank, _ = topology.init_distributed()
    from megatron_pd.platform.run_lock import job_lock

    with job_lock(cfg.run_dir, rank):
        return _run_locked(cfg, tokenizer, vocab_size, dp, rank)


def _run_locked(cfg, tokenizer, vocab_size, dp, rank) -> dict:
    import torch.distributed as dist

    from megatron_pd.data.datasets import build_splits, sample_ids_of
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.engine.trainer import Trainer
    from megatron_pd.models.checkpoint import CheckpointManager, load_checkpoint
    from megatron_pd.parallel import topology

    groups = topology.init_student_groups(cfg.parallel.tp, cfg.parallel.pp)
    if rank == 0:
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    total = cfg.total_steps()
    gbs = cfg.train.global_batch_size
    eval_samples = cfg.train.eval_batches * gbs if cfg.train.eval_interval else 0
    train_samples = total * gbs
    if cfg.distill.store_steps is not None:  # the recording run's sample order, exactly
        train_samples = recorded_train_samples(cfg.distill.store)
    splits = build_splits(
        cfg.data,
        tokenizer,
        (train_samples, eval_samples, 0),
        cfg.data.cache_dir or os.path.join(cfg.run_dir, "data_cache"),
    )
    sample_ids = sample_ids_of(splits)
    if cfg.distill.enabled:
        from megatron_pd.engine.distill_module import DistillTrainModule

        fingerprints = {}
        if cfg.distill.offline:  # the store must describe exactly these samples
            fingerprints = {name: ids.fingerprint() for name, ids in sample_ids.items()}
        module = DistillTrainModule(
            cfg, groups, vocab_size, dp, tokenizer.fingerprint, fingerprints
        )
        if cfg.distill.offline:
            module.check_store_coverage(sample_ids)
    else:
        module = TrainModule(cfg, groups, vocab_size, dp)
    if cfg.train.record_logits:
        module.enable_recording(cfg.train.record_logits, sample_ids["train"], tokenizer.fingerprint)
    save_dir = cfg.checkpoint.save_dir or os.path.join(cfg.run_dir, "checkpoints")
    checkpoints = CheckpointManager(save_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
    trainer = Trainer(
        cfg,
        module,
        splits,
        sample_ids,
        checkpoints,
        cfg.run_dir,
        dist.get_rank(groups.dp),
        tokenizer.fingerprint,
    )
    path = None
    if cfg.checkpoint.resume:
        from megatron_pd.models.checkpoint import resume_point

        root = cfg.checkpoint.load_dir or save_dir
        say = print if rank == 0 else (lambda *_: None)
        path = resume_point(root, cfg.checkpoint.fallback, say) if os.path.isdir(root) else None
    if path is not None:
        trainer.restore(load_checkpoint(module, path))
        if rank == 0:
            print(f"resumed from {path} at step {trainer.step}", flush=True)
    elif cfg.checkpoint.init_from:
        from megatron_pd.models.checkpoint import init_weights

        loaded = init_weights(module, cfg.checkpoint.init_from, tokenizer.fingerprint)
        if rank == 0:
            print(f"initialised the weights from {loaded}", flush=True)
    from megatron_pd.engine.trainer import TrainingStopped

    if rank == 0:
        from megatron_pd.loss.objective import resolve_implementation
        from megatron_pd.models.gpt import resolve_transformer_impl
        from megatron_pd.platform import stack_summary

        loss = resolve_implementation(cfg.loss.implementation) if cfg.distill.enabled else "none"
        impl = resolve_transformer_impl(cfg.model.transformer_impl)
        print(stack_summary(impl, loss, cfg.optimizer.name), flush=True)
    try:
        return trainer.fit()
    except TrainingStopped:  # every rank agrees on it (rank 0 reports it)
        raise
    except ValueError as err:  # e.g. a damaged logits shard: only the rank reading it knows
        raise RankLocalError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="megatron_pd training",
        epilog="Override any config field with --section.field=value (see --help-config).",
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the layout")
    parser.add_argument("--world-size", type=int, help="world size for --dry-run")
    parser.add_argument("--help-config", action="store_true", help="list every config field")
    return parser


def recorded_train_samples(store_dir: str) -> int:
    """The train-split size a recording pre-training run built its data for.

    megatron-core's sample order depends on how many samples a split is built for (the
    number of epochs), so a student reading a step window of recorded logits builds its
    train split for exactly that many.
    """
    from megatron_pd.logits.store_format import StoreHeader

    header = StoreHeader.read(os.path.join(store_dir, "train"))
    samples = header.teacher.get("train_samples")
    if header.source != "pretraining" or not samples:
        raise ValueError(
            f"distill.store_steps: {store_dir}/train was not recorded during a pre-training "
            f"run (source {header.source!r}); it has no training steps"
        )
    return int(samples)


class RankLocalError(ValueError):
    """A bad-input error found by one rank during training (every rank reports its own)."""


def main(argv=None) -> int:
    from megatron_pd.platform import quiet_known_warnings
    from megatron_pd.platform.lifetime import (
        contain_helpers,
        die_with_parent,
        launched_by_torchrun,
    )

    quiet_known_warnings()
    if launched_by_torchrun():  # a rank stops (saving) when its launcher dies, and nothing
        die_with_parent()  # it started outlives it
        contain_helpers()
    args, overrides = build_parser().parse_known_args(argv)
    if args.help_config:
        for name, type_name, default, doc in describe_fields():
            print(f"--{name} ({type_name}, default {default!r})\n      {doc}")
        return 0
    from megatron_pd.models.checkpoint import CheckpointWriteError

    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            return dry_run(cfg, world)
        run(cfg)
    except (ValueError, CheckpointWriteError) as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        elif isinstance(err, RankLocalError):
            print(f"error (rank {rank}): {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started (during it: save and exit)
        if rank == 0:
            print("interrupted before training started: nothing to save", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            from megatron_pd.parallel import topology

            topology.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
