"""Islands for local SGD: the world split into groups that train synchronously inside and exchange only
parameter deltas between them (EDiT / DiLoCo; see outer.py for the math).

Vocabulary: W world size, K number of islands, n_k ranks of island k, EP_k its expert-parallel size.

    islands       [[0, 1], [2, 3]]       island_size=2 on W=4, or an explicit list (any sizes, any order)
    island group  ranks of one island     DDP gradient all-reduce, expert all-to-all, router counts, barriers
    outer group   every rank (K islands)  the periodic exchange of pseudo-gradients, on its own backend
                                          (gloo on host memory by default, so islands of different vendors
                                          can join one job even when their device backends cannot talk)

Inside island k the usual (data, expert) grid of mesh.py applies with the island's own size and EP_k:
island-local rank i = position of the global rank in the island's list, and the expert groups are the rows
of that island's n_k/EP_k x EP_k grid, mapped back to global ranks. `IslandMesh` is an ExpertParallelMesh
whose world is the island, so apply_expert_parallel, the gradient reduction and the sharded checkpoint code
work unchanged inside an island.

`torch.distributed.new_group` is collective over the whole world: `build_island_mesh` creates every group
of every island in the same order on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moe_plugin.parallel.mesh import (
    ExpertParallelMesh,
    LayoutError,
    check_layout,
    expert_data_group_ranks,
    expert_group_ranks,
)


def parse_islands(
    world_size: int, island_size: int | None = None, islands: Sequence[Sequence[int]] | None = None
) -> list[list[int]]:
    """The islands as lists of global ranks, from `strategy.island_size` or `strategy.islands`. Pure.

    Exactly one of the two is given. island_size=s on W ranks gives [[0..s-1], [s..2s-1], ...].
    """
    if (island_size is None) == (islands is None):
        raise LayoutError(
            f"give exactly one of strategy.island_size ({island_size}) and strategy.islands ({islands}): "
            "e.g. strategy.island_size=2, or strategy.islands='[[0,1],[2,3]]'."
        )
    if islands is None:
        s = int(island_size)  # type: ignore[arg-type]
        if s < 1 or world_size % s:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise LayoutError(
                f"strategy.island_size={island_size} must divide the world size {world_size} "
                f"(trainer.devices x trainer.num_nodes). Use one of {divisors}, or list the ranks of each island "
                "with strategy.islands."
            )
        return [list(range(i, i + s)) for i in range(0, world_size, s)]
    out = [[int(r) for r in isl] for isl in islands]
    flat = sorted(r for isl in out for r in isl)
    if any(not isl for isl in out) or flat != list(range(world_size)):
        raise LayoutError(
            f"strategy.islands={out} must partition the ranks 0..{world_size - 1} (every rank in exactly one "
            "non-empty island)."
        )
    return out


def parse_expert_parallel_sizes(expert_parallel_size: int | Sequence[int], num_islands: int) -> list[int]:
    """One EP size per island: an int applies to every island, a list gives each island its own."""
    if isinstance(expert_parallel_size, int):
        return [expert_parallel_size] * num_islands
    sizes = [int(e) for e in expert_parallel_size]
    if len(sizes) != num_islands:
        raise LayoutError(
            f"strategy.expert_parallel_size={sizes} lists {len(sizes)} sizes for {num_islands} islands: give one "
            "per island, or a single int for all."
        )
    return sizes


def parse_inner_backends(inner_backend: str | Sequence[str | None] | None, num_islands: int) -> list[str | None]:
    """One collective backend per island for its own groups (None: the world group's backend).

    A string applies to every island, a list gives each island its own (e.g. ["nccl", "hccl"] for an NVIDIA and
    an Ascend island); the world group then needs a backend every rank has (strategy.process_group_backend).
    """
    if inner_backend is None or isinstance(inner_backend, str):
        return [inner_backend or None] * num_islands
    backends = [None if b in (None, "") else str(b) for b in inner_backend]
    if len(backends) != num_islands:
        raise LayoutError(
            f"strategy.inner_backend={list(inner_backend)} lists {len(backends)} backends for {num_islands} islands: "
            "give one per island (e.g. [nccl, hccl]), a single name for all, or null for the world group's backend."
        )
    return backends


def check_islands(islands: list[list[int]], ep_sizes: list[int], num_experts: Sequence[int] = ()) -> None:
    """check_layout for every island (its own size and EP), with the island named in the error."""
    for k, (isl, ep) in enumerate(zip(islands, ep_sizes)):
        try:
            check_layout(len(isl), ep, list(num_experts))
        except LayoutError as err:
            raise LayoutError(f"island {k} (ranks {isl}): {err}") from None


@dataclass(repr=False)
class IslandMesh(ExpertParallelMesh):
    """ExpertParallelMesh of this rank's island (world_size = n_k, rank = island-local rank), plus the islands.

    world_group is the island group; the rank lists it returns are GLOBAL ranks (what torch.distributed
    calls expect as broadcast sources).
    """

    island_index: int
    islands: list[list[int]]
    outer_group: dist.ProcessGroup | None

    @property
    def num_islands(self) -> int:
        return len(self.islands)

    @property
    def global_ranks(self) -> list[int]:
        return self.islands[self.island_index]

    @property
    def island_group(self) -> dist.ProcessGroup | None:
        return self.world_group

    def expert_group_ranks(self) -> list[int]:
        return [self.global_ranks[i] for i in super().expert_group_ranks()]

    def expert_data_group_ranks(self) -> list[int]:
        return [self.global_ranks[i] for i in super().expert_data_group_ranks()]

    def __repr__(self) -> str:
        return (
            f"IslandMesh(island={self.island_index}/{self.num_islands}, ranks={self.global_ranks}, "
            f"EP={self.expert_parallel_size}, DP={self.data_parallel_size}, local_rank={self.rank})"
        )


def build_island_mesh(
    islands: list[list[int]],
    ep_sizes: list[int],
    timeout: timedelta | None = None,
    backend: str | Sequence[str | None] | None = None,
    outer_backend: str | None = "gloo",
) -> IslandMesh:
    """Create the island, expert, expert-data-parallel and outer groups (collective: every rank, once).

    `backend`: the islands' own groups' backend, one name for all or one per island (parse_inner_backends);
    a rank only ever instantiates the backend of its own island (new_group builds nothing on non-members).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if sorted(r for isl in islands for r in isl) != list(range(world)):
        raise LayoutError(f"islands {islands} do not partition the {world} ranks of this job.")
    backends = parse_inner_backends(backend, len(islands))
    mine: dict[str, dist.ProcessGroup | None] = {}
    for isl, ep, island_backend in zip(islands, ep_sizes, backends):
        kw = {"timeout": timeout, "backend": island_backend}
        group = dist.new_group(isl, **kw)
        if rank in isl:
            mine["island"] = group
        for local in expert_group_ranks(len(isl), ep):
            group = dist.new_group([isl[i] for i in local], **kw)
            if rank in [isl[i] for i in local]:
                mine["expert"] = group
        for local in expert_data_group_ranks(len(isl), ep):
            group = dist.new_group([isl[i] for i in local], **kw)
            if rank in [isl[i] for i in local]:
                mine["expert_data"] = group
    outer = dist.new_group(list(range(world)), timeout=timeout, backend=outer_backend)
    k = next(i for i, isl in enumerate(islands) if rank in isl)
    return IslandMesh(
        world_size=len(islands[k]),
        rank=islands[k].index(rank),
        expert_parallel_size=ep_sizes[k],
        expert_group=mine["expert"],
        expert_data_group=mine["expert_data"],
        world_group=mine["island"],
        island_index=k,
        islands=islands,
        outer_group=outer,
    )


# ------------------------------------------------------------------ island-scoped collectives (the strategy's)
def island_barrier(mesh: IslandMesh) -> None:
    """Barrier over this rank's island only (islands never wait on each other between syncs)."""
    dist.barrier(group=mesh.island_group)


def island_broadcast_object(obj: Any, src: int, mesh: IslandMesh) -> Any:
    """`obj` from island-local rank `src` to every rank of the island."""
    box = [obj]
    dist.broadcast_object_list(box, src=mesh.global_ranks[src], group=mesh.island_group)
    return box[0]


def island_flag(value: int, mesh: IslandMesh, device: torch.device | str) -> int:
    """The island leader's integer flag (e.g. "received SIGTERM"), on every rank of the island."""
    flag = torch.tensor([int(value)], device=device)
    if mesh.world_size > 1:
        dist.broadcast(flag, src=mesh.global_ranks[0], group=mesh.island_group)
    return int(flag.item())
