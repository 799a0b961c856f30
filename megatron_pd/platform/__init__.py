"""Where megatron_pd runs: the megatron-core CPU adaptation (cpu_adapter) and runtime noise."""

import importlib.util
import logging
import warnings

# Messages megatron-core prints on every CPU import or step, which say nothing actionable:
# our CPU path is deliberate (torch norms, torch optimizers, no fused kernels).
_KNOWN_NOISE = (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r"full scope is deprecated.*",
    r"When using async grad allreduce it is recommended.*",
    r".*torch.distributed.reduce_scatter_tensor.* is deprecated.*",
    r".*torch.distributed.all_gather_into_tensor.* is deprecated.*",
    r"The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.*",
    # megatron-core 0.19's logging outside torch.distributed (single-process tools): rank 0.
    r"Could not determine rank from torch.distributed.*",
    # torch's deprecations of what megatron-core's dist_checkpointing calls on every load
    r"`load_state_dict` is deprecated and will be removed.*",
    r"Please use DTensor instead and we are deprecating ShardedTensor.*",
    # megatron-core 0.19 on import of its models package
    r"MimoModelConfig is experimental.*",
    # torch, when megatron-core 0.19 reads checkpoint metadata before the process group
    # exists (validation reads the teacher's shape first)
    r"torch.distributed is disabled, unavailable or uninitialized.*",
    r"The argument order of load has been changed.*",
)

# Log lines (not warnings) megatron-core 0.19 and torch's CUDA build print on CPU at every
# start, which say nothing about the run: dropped from the default (last-resort) and root
# handlers' output.
_KNOWN_LOG_NOISE = (
    "GPTModel IS DEPRECATED",
    "full_param_layout not provided with use_distributed_optimizer",
    "MCore's async save is deprecated",
    "No CUDA runtime is found, using CUDA_HOME",
)


class _QuietLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(text in message for text in _KNOWN_LOG_NOISE)


_QUIET_LOG = _QuietLog()


def quiet_known_warnings() -> None:
    """Silence megatron-core's known, non-actionable warnings (entry points call this)."""
    for pattern in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    import torch  # noqa: F401  (torch sets up its own log handlers on import)

    handlers = [logging.lastResort, *logging.getLogger().handlers]
    handlers += logging.getLogger("torch").handlers
    for handler in handlers:
        if handler is not None and _QUIET_LOG not in handler.filters:
            handler.addFilter(_QUIET_LOG)


def stack_summary(transformer_impl: str, loss_impl: str, optimizer: str) -> str:
    """One line naming what this job computes with, in place of megatron-core's per-import
    notices (printed once per job by rank 0)."""
    import megatron.core
    import torch

    def have(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    cuda = torch.cuda.is_available()
    where = f"{torch.cuda.device_count()} CUDA device(s), nccl" if cuda else "CPU, gloo"
    te = "installed" if have("transformer_engine") else "not installed"
    if transformer_impl == "transformer_engine":
        layers = "Transformer Engine layer spec"
    else:
        layers = f"local layer spec, torch norms (Transformer Engine {te})"
    apex = "Apex fused" if have("apex") else "torch (Apex not installed)"
    return (
        f"stack: torch {torch.__version__} ({where}) | megatron-core {megatron.core.__version__}: "
        f"{layers} | optimizer {optimizer}: {apex} | distillation loss: {loss_impl}"
    )
