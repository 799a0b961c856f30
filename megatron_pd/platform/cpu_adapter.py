"""Run megatron-core on a machine without CUDA: every runtime adaptation, in one place.

megatron-core (0.16.1 and 0.19.2 tested) assumes CUDA in a handful of spots that have nothing
to do with the math: it allocates buffers on ``torch.cuda.current_device()``, writes literal
``device="cuda"`` in factory calls, forks a CUDA RNG state in every attention forward, calls
``Tensor.cuda()``/``torch.cuda.synchronize()`` (and, from 0.19, ``torch.cuda.current_stream()``)
on a few paths, and its optimizers accept only parameters whose ``type()`` names a CUDA tensor.
Each of those is adapted here, at runtime, without editing megatron's files:

==================  ========================================================================
patch               what it does on a CPU-only machine
==================  ========================================================================
current_device      ``torch.cuda.current_device()`` returns the CPU device
cuda_factories      a ``TorchFunctionMode`` rewrites a CUDA ``device=`` (or ``.to("cuda")``)
                    to CPU, the mechanism ``torch.set_default_device`` uses
rng_tracker         megatron's RNG-states tracker keeps CPU generator states
tensor_cuda         ``Tensor.cuda()`` / ``Module.cuda()`` return the object unchanged (CPU)
synchronize         ``torch.cuda.synchronize()`` is a no-op
current_stream      (0.19+) ``torch.cuda.current_stream()`` returns torch's CPU stream,
                    whose ``wait_event``/``wait_stream`` are no-ops: 0.19's DDP bucket sync
                    asks for it before every gradient reduction, 0.16-0.18 only on paths
                    CPU runs never take
optimizer_types     while megatron's mixed-precision optimizers sort their parameters,
                    ``Tensor.type()`` reports the CUDA type names they compare against
==================  ========================================================================

The causal attention mask is not patched: callers pass an explicit mask (see
``megatron_pd.models.gpt.causal_attention_mask``), because megatron's default one is built on
"cuda".

``activate()`` does nothing when CUDA is available (unless ``force=True``, used by tests), so a
GPU run never sees any of this. ``patch_hits()`` counts how often each adaptation actually
fired, which is how the tests prove that every one of them is needed and exercised.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.metadata

import torch
from packaging.version import Version
from torch.overrides import TorchFunctionMode

# Read from the package metadata, not megatron.core.__version__ (0.19 appends a local tag),
# and without importing megatron (seconds) at import time.
MCORE_VERSION = Version(importlib.metadata.version("megatron-core")).release

# The adaptations the installed megatron-core needs, each proven to fire by a test; a patch
# that a version does not need is not installed, so the test keeps every entry honest.
PATCH_NAMES = (
    "current_device",
    "cuda_factories",
    "rng_tracker",
    "tensor_cuda",
    "synchronize",
    *(("current_stream",) if MCORE_VERSION >= (0, 19) else ()),
    "optimizer_types",
)

_hits: collections.Counter = collections.Counter()
_active = False
_mode: _CudaToCpuMode | None = None
_originals: dict = {}

_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def is_active() -> bool:
    """Whether the CPU adaptation is in force in this process."""
    return _active


def patch_hits() -> dict:
    """How many times each adaptation fired since activation (name -> count)."""
    return {name: _hits[name] for name in PATCH_NAMES}


def reset_patch_hits() -> None:
    """Zero the counters of ``patch_hits`` (tests use it to attribute hits to one action)."""
    _hits.clear()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of any torch call to the CPU device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
            _hits["cuda_factories"] += 1
        elif func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
            _hits["cuda_factories"] += 1
        return func(*args, **kwargs)


def _current_device():
    _hits["current_device"] += 1
    return _CPU


def _synchronize(device=None):
    _hits["synchronize"] += 1


def _current_stream(device=None):
    _hits["current_stream"] += 1
    return torch.cpu.current_stream()


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    _hits["tensor_cuda"] += 1
    return self


def _module_cuda(self, device=None):
    _hits["tensor_cuda"] += 1
    return self


@contextlib.contextmanager
def _cuda_type_names():
    """Within the block, ``Tensor.type()`` (no argument) names CPU float tensors as CUDA ones."""
    original = torch.Tensor.type

    def type_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = original(self)
            if name in _CUDA_TYPE_NAMES:
                _hits["optimizer_types"] += 1
                return _CUDA_TYPE_NAMES[name]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_as_cuda
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _type_checking_functions():
    """(owner, attribute) of the megatron functions that test ``type()`` against CUDA names.

    The constructors sort parameters into fp32/fp16/bf16 groups by type name, and
    ``clip_grad_by_total_norm_fp32`` asserts a CUDA float gradient; optimizer.py holds its own
    reference to the latter, so both names are wrapped.
    """
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    return (
        (distrib_optimizer.DistributedOptimizer, "__init__"),
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (clip_grads, "clip_grad_by_total_norm_fp32"),
        (optimizer, "clip_grad_by_total_norm_fp32"),
    )


def _cpu_rng_tracker_class():
    """A megatron RNG-states tracker whose named states are CPU generator states."""
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """Same contract as megatron's tracker (add/fork/get_states/set_states) on the CPU RNG."""

        def add(self, name, seed):
            _hits["rng_tracker"] += 1
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            _hits["rng_tracker"] += 1
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    return CpuRNGStatesTracker


def activate(force: bool = False) -> bool:
    """Install the CPU adaptations if CUDA is absent (or ``force``). Idempotent.

    Must run before megatron-core builds models or optimizers. Returns whether the adaptation
    is active afterwards.
    """
    global _active, _mode
    if _active:
        return True
    if torch.cuda.is_available() and not force:
        return False

    from megatron.core.tensor_parallel import random as mcore_random

    _originals.update(
        current_device=torch.cuda.current_device,
        synchronize=torch.cuda.synchronize,
        current_stream=torch.cuda.current_stream,
        tensor_cuda=torch.Tensor.cuda,
        module_cuda=torch.nn.Module.cuda,
        rng_tracker_class=mcore_random.CudaRNGStatesTracker,
    )
    torch.cuda.current_device = _current_device
    torch.cuda.synchronize = _synchronize
    if "current_stream" in PATCH_NAMES:
        torch.cuda.current_stream = _current_stream
    torch.Tensor.cuda = _tensor_cuda
    torch.nn.Module.cuda = _module_cuda

    # megatron's initialize_rng_tracker instantiates the class by its module-global name.
    mcore_random.CudaRNGStatesTracker = _cpu_rng_tracker_class()
    mcore_random.initialize_rng_tracker(force_reset=True)

    for owner, name in _type_checking_functions():
        original = getattr(owner, name)
        _originals[(owner, name)] = original
        setattr(owner, name, _with_cuda_type_names(original))

    _mode = _CudaToCpuMode()
    _mode.__enter__()
    _active = True
    return True


def deactivate() -> None:
    """Undo ``activate`` (tests only: a process normally keeps the adaptation for its life)."""
    global _active, _mode
    if not _active:
        return
    from megatron.core.tensor_parallel import random as mcore_random

    _mode.__exit__(None, None, None)
    _mode = None
    torch.cuda.current_device = _originals.pop("current_device")
    torch.cuda.synchronize = _originals.pop("synchronize")
    torch.cuda.current_stream = _originals.pop("current_stream")
    torch.Tensor.cuda = _originals.pop("tensor_cuda")
    torch.nn.Module.cuda = _originals.pop("module_cuda")
    mcore_random.CudaRNGStatesTracker = _originals.pop("rng_tracker_class")
    mcore_random.initialize_rng_tracker(force_reset=True)
    for owner, name in _type_checking_functions():
        setattr(owner, name, _originals.pop((owner, name)))
    _active = False
