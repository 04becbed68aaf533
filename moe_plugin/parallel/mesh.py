"""The process mesh of expert parallelism x sharded data parallelism, every axis in one object.

Vocabulary: W world size, EP expert-parallel size, DP = W / EP expert-data-parallel size,
S data-parallel shard size (FSDP2 of the dense part), R = W / S data-parallel replicate size (HSDP),
ES expert shard size (experts fully sharded over ES of their DP replicas), ER = DP / ES.

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

Sharded data parallelism (S > 1, see sharding.py) adds two torch DeviceMeshes over the same ranks:

    dense  mesh  [R, S]       rank = r * S + s                  dense modules: fully_shard, HSDP over R
    expert mesh  [EP, ER, ES] rank = (er * ES + es) * EP + ep    experts: fully_shard over (ER, ES) of
                                                                 their own ep coordinate ("efsdp")

ES = DP whenever S > 1: every expert is fully sharded over all its expert-data-parallel ranks (ER = 1),
as issue 10 asks, so expert weights, gradients and Adam moments cost 16 B x P_experts / W per rank
whatever the split between EP and S. (torchtitan carves EP out of the shard axis, ES = S / EP, which
leaves experts replicated when EP = S: EP 2 x S 2 would keep the experts' whole state on both DP ranks.)
With S = 1 the experts stay replicated over DP (DDP, ES = 1, ER = DP). `strategy.expert_shard_size` picks
another ES when S > 1: any divisor of DP (valid_expert_shard_sizes), e.g. ES = 1 keeps whole experts on every
DP replica (no expert all-gathers, their gradients all-reduced over ER = DP: faster where memory allows), an
ES between 1 and DP is HSDP of the experts. The expert coordinates keep
dp_rank = er * ES + es = rank // EP, so the all-to-all groups and the checkpoint's expert ranges are
those of the S = 1 layout.

The groups are created with an explicit timeout so a dead peer turns into an error instead of a hang.
`torch.distributed.new_group` is collective over the whole world: every rank creates every group in
the same order, which `build_expert_parallel_mesh` does.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


class LayoutError(ValueError):
    """An impossible (world size, expert-parallel size, number of experts) combination."""


def check_layout(
    world_size: int,
    expert_parallel_size: int,
    num_experts: list[int] | tuple[int, ...] = (),
    data_parallel_shard_size: int = 1,
    data_parallel_replicate_size: int | None = None,
    expert_shard_size: int | None = None,
) -> None:
    """Raise LayoutError naming the config key and the fix. Pure: safe to call before any process waits."""
    ep, w, s = expert_parallel_size, world_size, data_parallel_shard_size
    if s < 1:
        raise LayoutError(f"strategy.data_parallel_shard_size={s} must be >= 1 (1 = dense part replicated, DDP).")
    if w % s:
        divisors = [d for d in range(1, w + 1) if w % d == 0]
        raise LayoutError(
            f"The world size {w} (trainer.devices x trainer.num_nodes) is not divisible by "
            f"strategy.data_parallel_shard_size={s}. Use a data_parallel_shard_size in {divisors}."
        )
    if data_parallel_replicate_size is not None and data_parallel_replicate_size * s != w:
        raise LayoutError(
            f"strategy.data_parallel_replicate_size={data_parallel_replicate_size} x strategy.data_parallel_shard_size="
            f"{s} must equal the world size {w}. Set data_parallel_replicate_size={w // s} or null (derived)."
        )
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
    resolve_expert_shard_size(w, ep, s, expert_shard_size)


@dataclass
class ExpertParallelMesh:
    """This rank's coordinates on the DP x EP grid and the process groups along each axis."""

    world_size: int
    rank: int
    expert_parallel_size: int
    expert_group: dist.ProcessGroup | None
    expert_data_group: dist.ProcessGroup | None
    world_group: dist.ProcessGroup | None
    # keyword-only, so that subclasses (parallel/islands.py's IslandMesh) can add required fields
    _: KW_ONLY
    data_parallel_shard_size: int = 1
    dense_mesh: DeviceMesh | None = None  # [R, S] ("dp_replicate", "dp_shard"); None when S = 1
    expert_mesh: DeviceMesh | None = None  # [EP, ER, ES] ("ep", "edp_replicate", "edp_shard"); None when S = 1
    requested_expert_shard_size: int | None = None  # strategy.expert_shard_size (None: the default rule)

    @property
    def sharded(self) -> bool:
        """True when the dense part is fully sharded (S > 1): FSDP2 instead of DDP."""
        return self.data_parallel_shard_size > 1

    @property
    def data_parallel_replicate_size(self) -> int:
        """R: replicas of each dense shard (HSDP's replicate axis); W when S = 1 (plain DDP)."""
        return self.world_size // self.data_parallel_shard_size

    @property
    def expert_shard_size(self) -> int:
        """ES: over how many of its DP replicas each expert is fully sharded."""
        return resolve_expert_shard_size(
            self.world_size, self.expert_parallel_size, self.data_parallel_shard_size, self.requested_expert_shard_size
        )

    @property
    def expert_replicate_size(self) -> int:
        """ER = DP / ES: replicas of each expert shard."""
        return self.data_parallel_size // self.expert_shard_size

    def expert_fsdp_mesh(self) -> DeviceMesh:
        """The 2-D (ER, ES) mesh this rank's experts are fully sharded over (its own ep coordinate)."""
        if self.expert_mesh is None:
            raise RuntimeError("the expert mesh exists only with strategy.data_parallel_shard_size > 1")
        return self.expert_mesh["edp_replicate", "edp_shard"]

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
            f"DP={self.data_parallel_size}, S={self.data_parallel_shard_size}, R={self.data_parallel_replicate_size}, "
            f"ES={self.expert_shard_size}, rank={self.rank}, ep_rank={self.ep_rank}, dp_rank={self.dp_rank})"
        )


def valid_expert_shard_sizes(world_size: int, expert_parallel_size: int, data_parallel_shard_size: int) -> list[int]:
    """The ES values a layout allows: every divisor of DP = W / EP when S > 1 (ER = DP / ES replicas of each
    expert shard, HSDP over them), only 1 when S = 1 (experts replicated and reduced as in DDP)."""
    if data_parallel_shard_size <= 1:
        return [1]
    dp = world_size // expert_parallel_size
    return [d for d in range(1, dp + 1) if dp % d == 0]


def resolve_expert_shard_size(
    world_size: int,
    expert_parallel_size: int,
    data_parallel_shard_size: int,
    requested: int | None = None,
) -> int:
    """ES: `requested` (strategy.expert_shard_size) checked against valid_expert_shard_sizes, or by default
    DP = W / EP when the dense part is sharded (S > 1), else 1 (see the module docstring).

    The one rule for the mesh, sharding.py, the strategy's config check and the planner (parallel/plan.py).
    Raises LayoutError naming strategy.expert_shard_size, the value and the valid values."""
    valid = valid_expert_shard_sizes(world_size, expert_parallel_size, data_parallel_shard_size)
    if requested is None:
        return valid[-1]
    if not isinstance(requested, int) or isinstance(requested, bool) or requested not in valid:
        w, ep, s = world_size, expert_parallel_size, data_parallel_shard_size
        why = (
            "with strategy.data_parallel_shard_size=1 the experts are replicated over their data-parallel ranks "
            "(DDP); sharding them needs data_parallel_shard_size > 1"
            if s <= 1
            else f"it must divide the {w // ep} data-parallel replicas of each expert (world size {w} / "
            f"strategy.expert_parallel_size={ep})"
        )
        raise LayoutError(
            f"strategy.expert_shard_size={requested!r} is not valid here: {why}. Use one of {valid}, "
            f"or null (= {valid[-1]}: every expert fully sharded over all its data-parallel ranks)."
        )
    return requested


def dense_mesh_ranks(world_size: int, data_parallel_shard_size: int) -> torch.Tensor:
    """[R, S] grid of ranks, shard axis fastest."""
    return torch.arange(world_size).reshape(world_size // data_parallel_shard_size, data_parallel_shard_size)


def expert_mesh_ranks(
    world_size: int,
    expert_parallel_size: int,
    data_parallel_shard_size: int,
    requested_expert_shard_size: int | None = None,
) -> torch.Tensor:
    """[EP, ER, ES] grid of ranks: rank = (er * ES + es) * EP + ep."""
    ep = expert_parallel_size
    es = resolve_expert_shard_size(world_size, ep, data_parallel_shard_size, requested_expert_shard_size)
    er = world_size // ep // es
    return torch.arange(world_size).reshape(er, es, ep).permute(2, 0, 1).contiguous()


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
    data_parallel_shard_size: int = 1,
    device_type: str = "cpu",
    expert_shard_size: int | None = None,
) -> ExpertParallelMesh:
    """Create the expert and expert-data-parallel groups, and with S > 1 the dense and expert DeviceMeshes
    (collective: call on every rank, once, in the same order).

    Without an initialised process group this returns a one-rank mesh (EP and S must then be 1), so the
    same code path serves single-process training and tests.
    """
    if not (dist.is_available() and dist.is_initialized()):
        check_layout(
            1,
            expert_parallel_size,
            data_parallel_shard_size=data_parallel_shard_size,
            expert_shard_size=expert_shard_size,
        )
        return ExpertParallelMesh(1, 0, expert_parallel_size, None, None, None)
    world, rank = dist.get_world_size(), dist.get_rank()
    check_layout(
        world,
        expert_parallel_size,
        data_parallel_shard_size=data_parallel_shard_size,
        expert_shard_size=expert_shard_size,
    )
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
    dense_mesh = expert_mesh = None
    if data_parallel_shard_size > 1:
        # DeviceMesh creates one group per slice of each dimension, collectively, in the same order everywhere
        dense_mesh = DeviceMesh(
            device_type,
            dense_mesh_ranks(world, data_parallel_shard_size),
            mesh_dim_names=("dp_replicate", "dp_shard"),
        )
        expert_mesh = DeviceMesh(
            device_type,
            expert_mesh_ranks(world, expert_parallel_size, data_parallel_shard_size, expert_shard_size),
            mesh_dim_names=("ep", "edp_replicate", "edp_shard"),
        )
    return ExpertParallelMesh(
        world,
        rank,
        expert_parallel_size,
        expert_group,
        expert_data_group,
        dist.group.WORLD,
        data_parallel_shard_size=data_parallel_shard_size,
        dense_mesh=dense_mesh,
        expert_mesh=expert_mesh,
        requested_expert_shard_size=expert_shard_size,
    )
