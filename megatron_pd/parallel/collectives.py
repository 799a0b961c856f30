"""Collectives with explicit process groups (no default-group surprises), across torch versions.

Each function is collective over ``group``: every rank of the group must call it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_stacked(tensor: torch.Tensor, group) -> torch.Tensor:
    """[R, *tensor.shape]: every rank's ``tensor`` stacked in group-rank order."""
    size = dist.get_world_size(group)
    if size == 1:
        return tensor.unsqueeze(0)
    out = torch.empty((size,) + tuple(tensor.shape), dtype=tensor.dtype, device=tensor.device)
    _all_gather_flat(out.view(-1), tensor.contiguous().view(-1), group=group)
    return out


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """In-place SUM all-reduce (a no-op for a group of one)."""
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def any_rank(flag: bool, group, device=None) -> bool:
    """True on every rank of ``group`` when ``flag`` holds on any of them (one MAX all-reduce
    of a one-element tensor on ``device``; default: CUDA under NCCL, else CPU). How the ranks
    agree to fail, skip or stop together when only some of them saw the reason."""
    if device is None:
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


class _CopyToGroupFunction(torch.autograd.Function):
    """Forward: identity. Backward: SUM all-reduce of the gradient over ``group``."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad.contiguous(), ctx.group), None


def copy_to_group(tensor: torch.Tensor, group) -> torch.Tensor:
    """A tensor replicated over ``group`` whose ranks each use it for their own shard of a
    computation: the backward sums the ranks' gradient parts (collective in backward)."""
    if dist.get_world_size(group) == 1:
        return tensor
    return _CopyToGroupFunction.apply(tensor, group)


class _GatherDim0Function(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: reduce-scatter along dim 0."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        gathered = all_gather_stacked(tensor.contiguous(), group)  # [R, rows, ...]
        return gathered.reshape(-1, *tensor.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        parts = grad.contiguous().reshape(size, -1, *grad.shape[1:])
        if dist.get_backend(ctx.group) == "gloo":  # gloo has no reduce-scatter of tensors
            return all_reduce_sum(parts, ctx.group)[rank].clone(), None
        out = torch.empty_like(parts[0])
        dist.reduce_scatter_tensor(out, parts.reshape(-1, *grad.shape[1:]), group=ctx.group)
        return out, None


def gather_dim0(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sequence-parallel input gathered along its first dim over ``group`` (the backward
    reduce-scatters the gradient: each rank keeps the sum for its own rows). Collective."""
    if dist.get_world_size(group) == 1:
        return tensor
    return _GatherDim0Function.apply(tensor, group)
