"""Checkpoints with megatron dist_checkpointing: atomic directories and a "latest" pointer.

Layout under a checkpoint root:

    iter_0000200/        a complete dist_checkpointing directory (model, optimizer, rng,
                         trainer state) - written as .iter_0000200.tmp/ and renamed when done
    latest               text file with the name of the newest complete directory, replaced
                         atomically after the rename (write temporary, fsync, rename)

A crash at any point leaves the previous "latest" checkpoint intact: an unfinished save only
leaves a ``.tmp`` directory, which the next save removes. With ``async_save`` the rename and
the pointer update run in the finalisation callback, after every rank's write completed.

The optimizer state uses the ``dp_reshardable`` format (DistributedOptimizer), which resumes on
the same TP/PP with any DP size; model weights reshard to any TP/PP.
"""

from __future__ import annotations

import inspect
import os
import shutil

import torch
import torch.distributed as dist

from megatron_pd.parallel.collectives import any_rank
from megatron_pd.platform.faults import fault

LATEST = "latest"
_PREFIX = "iter_"

SHARDED_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def latest_checkpoint(root: str) -> str | None:
    """Path of the newest complete checkpoint under ``root`` (None when there is none).

    Trusts the "latest" pointer, and checks the directory it names is complete (megatron
    writes metadata.json last). ValueError when the pointer names a missing directory.
    """
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise ValueError(f"{pointer} names {name}, which is missing or incomplete")
    return path


def checkpoint_problem(path: str) -> str | None:
    """What is wrong with checkpoint directory ``path`` (None: intact), read from its
    metadata without loading any tensor: metadata.json and the DCP metadata readable, the
    common state present (its own file, or inside the DCP files on megatron-core 0.19), every
    storage file there and as long as the items it holds."""
    from megatron_pd.platform import safe_loading

    safe_loading.install()
    for name in ("metadata.json", ".metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(path).read_metadata()
    except Exception as err:  # truncated or crafted: unpickling fails in several ways
        return f".metadata is unreadable ({type(err).__name__}: {str(err)[:200]})"
    # the common state: common.pt (megatron-core <= 0.18), or an item of the DCP files (0.19)
    items = getattr(metadata, "state_dict_metadata", None) or {}
    in_dcp = any(str(key).startswith("common_state") for key in items)
    if not in_dcp and not os.path.isfile(os.path.join(path, "common.pt")):
        return "common.pt is missing"
    needed: dict = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        size = os.path.getsize(file)
        if size < end:
            return f"{name} is truncated ({size:,} bytes, its items need {end:,})"
    return None


def resume_point(root: str, fallback: bool, log=print) -> str | None:
    """The checkpoint a run resumes from: ``latest`` if intact; else (``fallback``) the newest
    intact earlier one, with a loud warning; else a ValueError naming the damage."""
    try:
        latest = latest_checkpoint(root)
    except ValueError as err:
        if not fallback:
            msg = f"{err}; checkpoint.fallback=true resumes from an earlier one"
            raise ValueError(msg) from None
        latest = None
    if latest is not None:
        problem = checkpoint_problem(latest)
        if problem is None:
            return latest
        if not fallback:
            raise ValueError(
                f"the latest checkpoint {latest} is damaged: {problem}. checkpoint.fallback="
                "true resumes from the newest intact earlier checkpoint instead"
            )
    names = sorted(
        (n for n in os.listdir(root) if n.startswith(_PREFIX) and not n.endswith(".tmp")),
        reverse=True,
    )
    for name in names:
        candidate = os.path.join(root, name)
        if candidate == latest or checkpoint_problem(candidate) is not None:
            continue
        log(
            "\n" + "!" * 78 + f"\nWARNING: the latest checkpoint {latest or '(none)'} is "
            f"damaged; resuming from {candidate} instead (checkpoint.fallback=true). The "
            "steps after it are trained again.\n" + "!" * 78
        )
        return candidate
    if latest is None:
        return None
    raise ValueError(f"the latest checkpoint {latest} is damaged and no earlier one is intact")


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state_object(tp_rank: int, pp_rank: int, tp_size: int, pp_size: int, dp_rank: int):
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state", state, (pp_size, tp_size), (pp_rank, tp_rank), replica_id=dp_rank
    )


def sharded_state(module, groups, is_loading: bool, trainer_state: dict | None = None) -> dict:
    """The dist_checkpointing state of a TrainModule: model, optimizer, rng, trainer state."""
    tp_rank, tp_size = dist.get_rank(groups.tp), dist.get_world_size(groups.tp)
    pp_rank, pp_size = dist.get_rank(groups.pp), dist.get_world_size(groups.pp)
    dp_rank = dist.get_rank(groups.dp)
    # The same entries whether or not a step has run (a checkpoint at step 0 loads too).
    _materialize_optimizer_state(module.optimizer)
    model_state = _unwrap(module.model).sharded_state_dict(metadata=SHARDED_METADATA)
    state = {
        "model": model_state,
        "optimizer": module.optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=SHARDED_METADATA
        ),
        "rng_state": _rng_state_object(tp_rank, pp_rank, tp_size, pp_size, dp_rank),
    }
    if trainer_state is not None:
        state["trainer"] = trainer_state
    return state


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, unwritable path): the run stops, the
    previous checkpoint intact."""


def _directory_bytes(path: str) -> int:
    total = 0
    for current, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(current, name))
            except OSError:
                pass
    return total


def _state_bytes(module) -> int:
    """This rank's bytes of model and optimizer state (a checkpoint's size, about)."""
    total = sum(p.numel() * p.element_size() for p in module.model.parameters())
    for optimizer in _torch_optimizers(module.optimizer):
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def _no_space(err: BaseException) -> bool:
    import errno

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):
            return True
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict) and any(_no_space(f) for f in failures.values()):
            return True
        err = err.__cause__ or err.__context__
    return False


class CheckpointManager:
    """Saves and restores a TrainModule's state under ``root``; collective over the world."""

    def __init__(self, root: str, keep_last: int = 2, async_save: bool = False):
        self.root = root
        self.keep_last = keep_last
        self.async_save = async_save
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()

    def save(self, module, step: int, trainer_state: dict) -> str:
        """Write checkpoint ``step``; returns its final path (complete once finalised)."""
        from megatron.core import dist_checkpointing

        rank = dist.get_rank()
        final = os.path.join(self.root, checkpoint_name(step))
        tmp = os.path.join(self.root, "." + checkpoint_name(step) + ".tmp")
        self.wait()  # one save in flight at a time
        needed = self._check_space(module, rank)
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        dist.barrier()
        state = sharded_state(module, module.groups, is_loading=False, trainer_state=trainer_state)
        try:
            request = dist_checkpointing.save(
                state,
                tmp,
                async_sharded_save=self.async_save,
                validate_access_integrity=True,
                **_mcore_async_strategy(dist_checkpointing.save),
            )
        except Exception as err:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if _no_space(err):
                raise CheckpointWriteError(
                    f"checkpoint {final}: no space left on device (about {needed:,} bytes "
                    f"needed); the previous checkpoint is intact, the run stops"
                ) from None
            raise
        if self.async_save:
            request.add_finalize_fn(lambda: self._publish(tmp, final))
            self._queue.schedule_async_request(request)
            fault("async_save", step)
        else:
            dist.barrier()
            self._publish(tmp, final)
        return final

    def _check_space(self, module, rank: int) -> int:
        """Bytes this save needs (the last checkpoint's size, else the state's); every rank
        raises CheckpointWriteError if the file system has fewer free (before any write)."""
        device = module.device
        local = torch.tensor([float(_state_bytes(module))], dtype=torch.float64, device=device)
        dist.all_reduce(local)
        needed = int(local.item())
        message = ""
        if rank == 0:
            previous = latest_checkpoint(self.root) if os.path.isdir(self.root) else None
            if previous:
                needed = _directory_bytes(previous)
            os.makedirs(self.root, exist_ok=True)
            free = shutil.disk_usage(self.root).free
            if free < needed:
                message = (
                    f"checkpoint in {self.root}: {needed:,} bytes needed, {free:,} free on its "
                    "file system; the previous checkpoint is intact, the run stops"
                )
        if any_rank(bool(message), dist.group.WORLD, device):
            raise CheckpointWriteError(message or f"checkpoint in {self.root}: no space left")
        return needed

    def _publish(self, tmp: str, final: str) -> None:
        """Rank 0 renames the finished directory and moves "latest"; then old ones are pruned."""
        if dist.get_rank() == 0:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            fault("checkpoint_before_latest", int(os.path.basename(final)[len(_PREFIX) :]))
            _write_atomic(os.path.join(self.root, LATEST), os.path.basename(final) + "\n")
            self._prune(os.path.basename(final))
        dist.barrier()

    def _prune(self, newest: str) -> None:
        if self.keep_last <= 0:
            return
        names = sorted(
            n
            for n in os.listdir(self.root)
            if n.startswith(_PREFIX) and os.path.isdir(os.path.join(self.root, n))
        )
        for name in names[: max(0, len(names) - self.keep_last)]:
            if name != newest:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def poll(self) -> None:
        """Finalise background saves that completed (call once per step)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until every background save is finalised."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        self.wait()
        if self._queue is not None:
            self._queue.close()


def _mcore_async_strategy(save_fn) -> dict:
    """``async_strategy="mcore"`` where ``save`` takes it (megatron-core 0.19+), else nothing.

    0.19 defaults to the "nvrx" strategy, which needs nvidia-resiliency-ext; the "mcore" one
    is the writer 0.16 always uses, and it matches the AsyncCallsQueue this manager drives.
    """
    if "async_strategy" in inspect.signature(save_fn).parameters:
        return {"async_strategy": "mcore"}
    return {}


def load_checkpoint(module, path: str, load_optimizer: bool = True) -> dict:
    """Restore model (and optimizer, RNG) of ``module`` from ``path``; returns trainer state."""
    from megatron_pd.platform import safe_loading

    safe_loading.install()
    from megatron.core import dist_checkpointing

    with torch.no_grad():  # fp32 parameters are written in place
        state = sharded_state(module, module.groups, is_loading=True, trainer_state=None)
        if not load_optimizer:
            state.pop("optimizer")
        loaded = dist_checkpointing.load(state, path)
        _unwrap(module.model).load_state_dict(loaded["model"], strict=True)
        if load_optimizer:
            _fill_missing_common_step(loaded["optimizer"])
            module.optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_steps(module.optimizer, _saved_adam_step(loaded["optimizer"]))
    _restore_rng(loaded.get("rng_state"))
    return loaded.get("trainer", {})


def _unwrap(model):
    """The GPTModel inside megatron's DDP wrapper (checkpoint keys carry no wrapper prefix)."""
    return getattr(model, "module", model)


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron (possibly chained) optimizer."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt.optimizer for opt in chained if getattr(opt, "optimizer", None) is not None]


def _materialize_optimizer_state(optimizer) -> None:
    """Create zero optimizer state for every parameter that has none yet.

    torch creates Adam state lazily at the first step, but megatron's savers and loaders
    expect it to exist (without apex/TE they read one ``step`` per parameter). The values are
    exactly what torch's first step would create, so training is unchanged. Each parameter
    gets its own ``step`` tensor.
    """
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if state:
                    continue
                if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )
                elif isinstance(inner, torch.optim.SGD) and group.get("momentum", 0):
                    state["momentum_buffer"] = torch.zeros_like(param)


def _fill_missing_common_step(optimizer_state) -> None:
    """Restore Adam's step 0 in a non-distributed optimizer checkpoint written before step 1.

    megatron saves the shared step only ``if step:``, so a step-0 checkpoint has none, and
    torch's Adam refuses per-parameter state without one.
    """
    states = optimizer_state.get("state") if isinstance(optimizer_state, dict) else None
    if not isinstance(states, dict) or "common_step" in states:
        return
    for param_state in states.values():
        if isinstance(param_state, dict) and "exp_avg" in param_state:
            param_state.setdefault("step", torch.tensor(0.0))


def _saved_adam_step(optimizer_state) -> float | None:
    """The Adam step count recorded in a loaded megatron optimizer state (None if absent).

    Without apex/TE the DistributedOptimizer records it once, in its param_groups.
    """
    groups = (optimizer_state.get("optimizer") or {}).get("param_groups", [])
    steps = {group["step"] for group in groups if "step" in group}
    if len(steps) > 1:
        raise ValueError(f"checkpoint optimizer has inconsistent Adam steps {sorted(steps)}")
    return steps.pop() if steps else None


def _restore_adam_steps(optimizer, step: float | None) -> None:
    """Give every parameter its own, correct Adam ``step`` tensor after loading.

    megatron's DistributedOptimizer loader assigns one shared step tensor to all parameters
    (torch's Adam would then increment it once per parameter per step) and afterwards copies
    the pre-load placeholder value into it; both would corrupt Adam's bias correction.
    """
    for inner in _torch_optimizers(optimizer):
        for param_state in inner.state.values():
            current = param_state.get("step")
            if isinstance(current, torch.Tensor):
                value = current if step is None else torch.tensor(float(step))
                param_state["step"] = value.detach().clone().to(torch.float32)


def _restore_rng(state) -> None:
    if not state:
        return
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def init_weights(module, source_path: str, tokenizer_fingerprint: str | None) -> str:
    """Load only the model weights of ``module`` from ``checkpoint.init_from``; returns what was
    loaded. A megatron checkpoint reshards to the module's layout; an HF directory is read by
    this rank's slices. Then the optimizer's main parameters are refreshed from the model.
    """
    from megatron_pd.models.teacher import TeacherSource

    source = TeacherSource(source_path)
    model = _unwrap(module.model)
    model_cfg = module.cfg.model
    source.check_tokenizer(model_cfg, module.vocab.true_size, tokenizer_fingerprint)
    if source.kind == "hf":
        from megatron_pd.models.hf_config import model_config_from_hf, read_hf_config
        from megatron_pd.models.hf_weights import HFLayout, SafetensorsIndex, load_hf_weights

        hf_model, family = model_config_from_hf(
            read_hf_config(source.path), source.path, vocab_size=module.vocab.true_size
        )
        theirs, ours = _shape_of(hf_model), _shape_of(model_cfg)
        differing = [n for n in theirs if theirs[n] != ours[n]]
        if differing:
            raise ValueError(
                f"checkpoint.init_from={source_path}: its config.json differs from model.* in "
                + ", ".join(f"{n} ({theirs[n]!r} vs {ours[n]!r})" for n in differing)
            )
        layout = HFLayout(model_cfg, family, int(hf_model.padded_vocab_size))
        load_hf_weights(model, SafetensorsIndex(source.path), layout)
    else:
        from megatron.core import dist_checkpointing

        with torch.no_grad():
            state = {"model": model.sharded_state_dict(metadata=SHARDED_METADATA)}
            try:
                loaded = dist_checkpointing.load(state, source.checkpoint)
                model.load_state_dict(loaded["model"], strict=True)
            except Exception as err:  # shape/key mismatches surface as several types
                raise ValueError(
                    f"checkpoint.init_from={source_path}: its weights do not fit model.* "
                    f"({type(err).__name__}: {str(err)[:300]})"
                ) from None
    module.optimizer.reload_model_params()
    return source.checkpoint


def _shape_of(model_cfg) -> dict:
    """What decides the weights' shapes and meaning (init_from must match all of it)."""
    fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
    fields += ("tie_embeddings", "add_qkv_bias", "qk_layernorm", "activation", "normalization")
    shape = {name: getattr(model_cfg, name) for name in fields}
    shape.update(
        num_query_groups=model_cfg.query_groups,
        kv_channels=model_cfg.head_dim,
        # an imported model's HF rows (its checkpoint pads them to a multiple of 128)
        vocab_rows=model_cfg.hf_vocab_rows or model_cfg.padded_vocab_size,
    )
    return shape
