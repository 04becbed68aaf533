"""parallel/fsdp_comms.py's all-gather and reduce-scatter against gloo's own collectives (the obvious reference).

On 2 and 4 ranks (a 4-rank world split into two groups of 2, as EP 2 x shard 2 uses it, and the whole world),
for the "p2p" and "all_reduce" forms: the all-gather equals all_gather_into_tensor bit for bit (float and the
uint8 views FSDP uses for mixed dtypes); the reduce-scatter equals reduce_scatter_tensor (exactly on 2 ranks,
where a + b == b + a; to rounding on 4) for SUM and AVG, with shards of uneven numel relative to the chunk size.
The end-to-end check (FSDP2 training with these collectives equals one process) is test_sharded_layers.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from moe_plugin.parallel.fsdp_comms import (
    AllReduceAllGather,
    AllReduceReduceScatter,
    P2PAllGather,
    P2PReduceScatter,
    check_comms,
    custom_comms,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def _check_group(group: dist.ProcessGroup, seed: int) -> None:
    n, r = group.size(), group.rank()
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    for gather, scatter in ((P2PAllGather(), P2PReduceScatter()), (AllReduceAllGather(), AllReduceReduceScatter())):
        for k in (1, 7, 4099):  # elements per shard
            for dtype in (torch.float32, torch.bfloat16, torch.uint8):
                x = (torch.randn(k, generator=g) * 50).to(dtype)
                want = torch.empty(n * k, dtype=dtype)
                dist.all_gather_into_tensor(want, x, group=group)
                out = torch.full((n * k,), 3, dtype=dtype)  # garbage where the peers' shards go
                out.narrow(0, r * k, k).copy_(x)  # FSDP's copy-in writes this rank's shard in place
                assert gather(out, out.narrow(0, r * k, k), group) is None
                assert torch.equal(out, want), (type(gather).__name__, k, dtype)
                out2 = gather.allocate((n * k,), dtype=dtype, device=torch.device("cpu"))
                gather(out2, x.clone(), group)  # an input elsewhere is copied in first
                assert torch.equal(out2, want)
            for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
                grads = torch.randn(n * k, generator=g)
                want = torch.empty(k)
                dist.reduce_scatter_tensor(want, grads.clone(), op=dist.ReduceOp.SUM, group=group)
                if op == dist.ReduceOp.AVG:
                    want /= n
                got = torch.empty(k)
                scatter(got, grads.clone(), group, op)
                if n == 2:
                    assert torch.equal(got, want), (type(scatter).__name__, k, op)
                else:
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _comms(rank: int, world: int) -> None:
    _check_group(dist.group.WORLD, 0)
    if world == 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        _check_group(pairs[rank // 2], 1)
    assert isinstance(custom_comms("auto", dist.group.WORLD)[0], P2PAllGather)  # type: ignore[index]
    assert custom_comms("native", dist.group.WORLD) is None
    assert isinstance(custom_comms("all_reduce", dist.group.WORLD)[1], AllReduceReduceScatter)  # type: ignore[index]


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_comms_equal_gloo_collectives(world: int) -> None:
    run_distributed(_comms, world, timeout=150)


def test_unknown_comms_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"strategy.fsdp_comms='ring' is not one of \('auto', 'native', 'p2p'"):
        check_comms("ring")
