"""The one place that starts torch.distributed and creates process groups.

Rank layout (megatron-core's default order "tp-cp-ep-dp-pp" with cp = ep = 1):

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so tensor-parallel peers are adjacent ranks (same node), data-parallel peers are ``tp`` apart
and pipeline stages are ``tp * dp`` apart. ``layout_ranks`` computes every group from that
formula without any communication (used by ``--dry-run`` for any world size);
``init_student_groups`` asks megatron-core's parallel_state to create the student's groups
(megatron's optimizer and checkpointing read them) and returns them as a
``ProcessGroupCollection``; ``new_model_groups`` creates a second, independent set of groups
for another model (the teacher) with its own layout, touching no global state.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """A model's parallel layout over ``world_size`` ranks."""

    world_size: int
    tp: int
    pp: int

    def __post_init__(self):
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"tp*pp={self.tp}*{self.pp} does not divide the world size {self.world_size}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def coords(self, rank: int) -> dict:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        return {
            "tp": rank % self.tp,
            "dp": (rank // self.tp) % self.dp,
            "pp": rank // (self.tp * self.dp),
        }

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)


def layout_ranks(layout: Layout) -> dict:
    """Every group of the layout as lists of global ranks: tp, dp, pp, mp (tp x pp), embd."""
    tp, dp, pp = layout.tp, layout.dp, layout.pp
    groups = {
        "tp": [[layout.rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[layout.rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[layout.rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "mp": [[layout.rank(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)],
    }
    # Word embeddings live on the first stage and the (tied) output layer on the last.
    groups["embd"] = [sorted({ranks[0], ranks[-1]}) for ranks in groups["pp"]]
    return groups


def describe_layout(layout: Layout, name: str = "model") -> str:
    """Human-readable listing of the groups of a layout (the dry run prints it)."""
    lines = [f"{name}: world_size={layout.world_size} tp={layout.tp} pp={layout.pp} dp={layout.dp}"]
    for kind, groups in layout_ranks(layout).items():
        if kind == "mp":
            continue
        shown = " ".join(str(g) for g in groups[:8])
        more = f" ... (+{len(groups) - 8} more)" if len(groups) > 8 else ""
        lines.append(f"  {kind:4s} groups: {shown}{more}")
    return "\n".join(lines)


def device() -> torch.device:
    """The device this process computes on: its CUDA device under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _restart_store(world_size: int, timeout):
    """The rendezvous store of a torchrun restart, scoped to its attempt; None otherwise.

    With torchrun's default (static) rendezvous the agent keeps one TCPStore across
    ``--max-restarts`` attempts and torch adds no per-attempt prefix, so a restarted rank can
    read a dead rank's old address and wait on it (measured with gloo: the restarted job hung
    in init_process_group). Each attempt gets its own key space here.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt in (None, "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"megatron_pd/attempt_{attempt}", store)


def init_distributed(timeout_minutes: int = 30) -> tuple:
    """Start torch.distributed from torchrun's environment (or as a single process).

    NCCL when CUDA is available, gloo otherwise. On CPU the megatron-core adaptation is
    activated here, before any model is built. Returns (rank, world_size).
    """
    from megatron_pd.platform import cpu_adapter

    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if "MASTER_ADDR" not in os.environ:
            if world_size != 1:
                raise RuntimeError(
                    f"WORLD_SIZE={world_size} but MASTER_ADDR is unset: launch with torchrun"
                )
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        else:
            backend = "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            store=_restart_store(world_size, timeout),
        )
    cpu_adapter.activate()
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_student_groups(tp: int, pp: int):
    """Create the student's groups through megatron's parallel_state; returns them bundled.

    Collective over the whole world (every rank must call it). The returned
    ``ProcessGroupCollection`` is what our code passes around; megatron's own optimizer and
    dist-checkpointing read the same groups from parallel_state.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        order="tp-cp-ep-dp-pp",
    )
    return ProcessGroupCollection.use_mpu_process_groups()


def new_model_groups(layout: Layout):
    """A fresh set of groups for a second model (e.g. the teacher), without global state.

    Collective over the whole world: every rank creates every group in the same order
    (torch.distributed's rule for new_group) and keeps those it belongs to.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    rank = dist.get_rank()
    collection = ProcessGroupCollection()
    ranks = layout_ranks(layout)
    for kind in ("tp", "dp", "pp", "mp", "embd"):
        mine = None
        for group_ranks in ranks[kind]:
            group = dist.new_group(group_ranks)
            if rank in group_ranks:
                mine = group
        setattr(collection, kind, mine)
    # Context parallelism is not used: a group of one rank keeps megatron's code paths simple.
    for other in range(layout.world_size):
        group = dist.new_group([other])
        if other == rank:
            collection.cp = group
    collection.tp_cp = collection.tp
    collection.dp_cp = collection.dp
    collection.pos_embd = None
    return collection


def destroy() -> None:
    """Tear down megatron's groups and torch.distributed (end of a run or a test)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
