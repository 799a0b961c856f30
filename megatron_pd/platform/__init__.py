"""Where megatron_pd runs: the megatron-core CPU adaptation (cpu_adapter) and runtime noise."""

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
)


def quiet_known_warnings() -> None:
    """Silence megatron-core's known, non-actionable warnings (entry points call this)."""
    for pattern in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
