"""Our rank-layout math equals the groups megatron-core's parallel_state creates."""

import pytest
import torch.distributed as dist

from _dist import run_distributed
from megatron_pd.parallel.topology import Layout, layout_ranks


def test_layout_math_properties():
    layout = Layout(world_size=16, tp=2, pp=4)
    groups = layout_ranks(layout)
    assert layout.dp == 2
    for kind in ("tp", "dp", "pp"):
        flat = sorted(r for g in groups[kind] for r in g)
        assert flat == list(range(16)), kind  # each kind partitions the world
    assert groups["tp"][0] == [0, 1] and groups["dp"][0] == [0, 2]
    assert groups["pp"][0] == [0, 4, 8, 12] and groups["embd"][0] == [0, 12]
    for rank in range(16):
        assert layout.rank(**{f"{k}_rank": v for k, v in layout.coords(rank).items()}) == rank
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        Layout(world_size=6, tp=4, pp=1)


def megatron_groups(rank, world_size, tp, pp):
    from megatron_pd.parallel import topology

    groups = topology.init_student_groups(tp, pp)
    mine = {kind: sorted(dist.get_process_group_ranks(getattr(groups, kind)))
            for kind in ("tp", "dp", "pp", "embd")}
    teacher = topology.new_model_groups(Layout(world_size, pp, tp))  # another layout
    mine["teacher_tp"] = sorted(dist.get_process_group_ranks(teacher.tp))
    return mine


@pytest.mark.parametrize("tp, pp", [(2, 2), (4, 1), (1, 2)])
def test_megatron_creates_the_same_groups(tp, pp):
    layout = Layout(4, tp, pp)
    expected = layout_ranks(layout)
    teacher_expected = layout_ranks(Layout(4, pp, tp))["tp"]
    for rank, mine in enumerate(run_distributed(megatron_groups, 4, tp, pp)):
        for kind in ("tp", "dp", "pp", "embd"):
            assert mine[kind] in expected[kind], (kind, rank)
            assert rank in mine[kind]
        assert mine["teacher_tp"] in teacher_expected and rank in mine["teacher_tp"]
