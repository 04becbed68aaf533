"""The (data, expert) process mesh of expert parallelism, built once from the world size and EP.

Vocabulary: W world size, EP expert-parallel size, DP = W / EP expert-data-parallel size.

Ranks are laid out row-major on a DP x EP grid, expert axis fastest, so an expert group is EP
consecutive ranks (on one node whenever EP divides the devices per node: the all-to-all stays on the
fastest links, as in Megatron-Core and DeepSpeed):

    rank = dp_rank * EP + ep_rank

    expert group (size EP):              ranks {dp_rank * EP + j : j < EP}   -> all-to-all of tokens
    expert-data-parallel group (size DP): ranks {i * EP + ep_rank : i < DP}   -> expert gradient sum
    world (size W):                       every rank                          -> dense gradients (DDP),
                                                                                  router token counts

Every rank processes distinct data, so the number of data shards is W (not DP): dense gradients are
averaged over W by DDP, and expert gradients are summed over the expert-data-parallel group and divided
by W (see grads.py).

The groups are created with an explicit timeout so a dead peer turns into an error instead of a hang.
`torch.distributed.new_group` is collective over the whole world: every rank creates every group in
the same order, which `build_expert_parallel_mesh` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


class LayoutError(ValueError):
    """An impossible (world size, expert-parallel size, number of experts) combination."""


def check_layout(world_size: int, expert_parallel_size: int, num_experts: list[int] | tuple[int, ...] = ()) -> None:
    """Raise LayoutError naming the config key and the fix. Pure: safe to call before any process waits."""
    ep, w = expert_parallel_size, world_size
    if ep < 1:
        raise LayoutError(f"strategy.expert_parallel_size={ep} must be >= 1 (1 = every rank holds every expert).")
    if ep > w:
        raise LayoutError(
            f"strategy.expert_parallel_size={ep} is larger than the world size {w} "
            f"(trainer.devices x trainer.num_nodes). Lower strategy.expert_parallel_size to at most {w} "
            f"or raise trainer.devices to at least {ep}."
        )
    if w % ep:
        divisors = [d for d in range(1, w + 1) if w % d == 0]
        raise LayoutError(
            f"The world size {w} (trainer.devices x trainer.num_nodes) is not divisible by "
            f"strategy.expert_parallel_size={ep}. Use an expert_parallel_size in {divisors}, "
            f"or a world size that is a multiple of {ep}."
        )
    for e in sorted(set(num_experts)):
        if e % ep:
            divisors = [d for d in range(1, e + 1) if e % d == 0 and w % d == 0]
            raise LayoutError(
                f"model.moe.num_experts={e} is not divisible by strategy.expert_parallel_size={ep}: each rank of an "
                f"expert group must hold the same number of experts. Use strategy.expert_parallel_size in "
                f"{divisors}, or a number of experts that is a multiple of {ep}."
            )


@dataclass
class ExpertParallelMesh:
    """This rank's coordinates on the DP x EP grid and the process groups along each axis."""

    world_size: int
    rank: int
    expert_parallel_size: int
    expert_group: dist.ProcessGroup | None
    expert_data_group: dist.ProcessGroup | None
    world_group: dist.ProcessGroup | None

    @property
    def data_parallel_size(self) -> int:
        """DP: how many replicas of each expert exist (world size / EP)."""
        return self.world_size // self.expert_parallel_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.expert_parallel_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.expert_parallel_size

    def expert_group_ranks(self) -> list[int]:
        return expert_group_ranks(self.world_size, self.expert_parallel_size)[self.dp_rank]

    def expert_data_group_ranks(self) -> list[int]:
        return expert_data_group_ranks(self.world_size, self.expert_parallel_size)[self.ep_rank]

    def local_expert_range(self, num_experts: int) -> tuple[int, int]:
        """[start, stop) of the global expert ids this rank holds for a layer of `num_experts` experts."""
        per_rank = num_experts // self.expert_parallel_size
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank

    def __repr__(self) -> str:
        return (
            f"ExpertParallelMesh(world={self.world_size}, EP={self.expert_parallel_size}, "
            f"DP={self.data_parallel_size}, rank={self.rank}, ep_rank={self.ep_rank}, dp_rank={self.dp_rank})"
        )


def expert_group_ranks(world_size: int, expert_parallel_size: int) -> list[list[int]]:
    """The expert groups: rows of the DP x EP grid."""
    ep = expert_parallel_size
    return [list(range(i * ep, (i + 1) * ep)) for i in range(world_size // ep)]


def expert_data_group_ranks(world_size: int, expert_parallel_size: int) -> list[list[int]]:
    """The expert-data-parallel groups: columns of the DP x EP grid."""
    ep = expert_parallel_size
    return [list(range(j, world_size, ep)) for j in range(ep)]


def build_expert_parallel_mesh(
    expert_parallel_size: int,
    timeout: timedelta | None = None,
    backend: str | None = None,
) -> ExpertParallelMesh:
    """Create the expert and expert-data-parallel groups (collective: call on every rank, once).

    Without an initialised process group this returns a one-rank mesh (EP must then be 1), so the same
    code path serves single-process training and tests.
    """
    if not (dist.is_available() and dist.is_initialized()):
        check_layout(1, expert_parallel_size)
        return ExpertParallelMesh(1, 0, expert_parallel_size, None, None, None)
    world, rank = dist.get_world_size(), dist.get_rank()
    check_layout(world, expert_parallel_size)
    kwargs = {"timeout": timeout, "backend": backend}
    expert_group = expert_data_group = None
    for ranks in expert_group_ranks(world, expert_parallel_size):
        group = dist.new_group(ranks, **kwargs)
        if rank in ranks:
            expert_group = group
    for ranks in expert_data_group_ranks(world, expert_parallel_size):
        group = dist.new_group(ranks, **kwargs)
        if rank in ranks:
            expert_data_group = group
    return ExpertParallelMesh(world, rank, expert_parallel_size, expert_group, expert_data_group, dist.group.WORLD)
