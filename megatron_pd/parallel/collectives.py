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
