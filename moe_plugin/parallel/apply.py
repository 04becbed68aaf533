"""apply_expert_parallel(model, mesh): keep only this rank's experts and install the all-to-all dispatcher.

Shapes: E global experts of a layer, L = E / EP local experts, D hidden, F expert FFN hidden.

For every MoE layer of `model` (found by type, so users' own models work too):

    experts.w_*_E..   -> w_*_E..[start:stop]  with [start, stop) = mesh.local_expert_range(E)
    experts.expert_offset = start              (checkpoints store experts by global id = offset + local id)
    moe.dispatcher    = AllToAllDispatcher(E, L, start, mesh.expert_group)
    moe.count_reduce  = sum over the world     (router token counts of the global micro-batch)

The router, attention, norms, embeddings and shared experts stay whole on every rank (dense,
replicated, averaged by DDP). Parameter names do not change, only the leading expert dimension, so an
optimizer built afterwards has the same parameter order as one built on the unsharded model (the
checkpoint code relies on this to map optimizer state between layouts).

Expert weights are taken from the model as built on this rank, then broadcast from the first rank of
each expert-data-parallel group, so replicas of an expert start identical even if ranks were seeded
differently. A model built on the meta device (materialise.py) is sliced without memory and broadcasts
nothing: its experts are initialised per global expert id later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moe_plugin.dispatch.all_to_all import AllToAllDispatcher
from moe_plugin.dispatch.reduce import AllReduceSum
from moe_plugin.layers.moe import MoE, moe_layers
from moe_plugin.parallel.mesh import ExpertParallelMesh, check_layout


@dataclass
class ExpertParallelPlan:
    """What apply_expert_parallel did: which parameters are sharded experts and their global ranges."""

    mesh: ExpertParallelMesh
    # fully qualified parameter name (relative to the model passed in) -> (global E, local start, local stop)
    expert_params: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def expert_names(self, prefix: str = "") -> list[str]:
        return [prefix + n for n in self.expert_params]


def expert_parameter_names(model: nn.Module) -> dict[str, int]:
    """Stacked expert parameters of every MoE layer: fully qualified name -> number of global experts."""
    names: dict[str, int] = {}
    layer_names = {id(m): n for n, m in model.named_modules()}
    for layer in moe_layers(model):
        prefix = layer_names[id(layer)]
        prefix = f"{prefix}.experts." if prefix else "experts."
        for pname, _ in layer.experts.named_parameters():
            names[prefix + pname] = layer.num_experts
    return names


def apply_expert_parallel(
    model: nn.Module, mesh: ExpertParallelMesh, reduce_router_counts: bool = True
) -> ExpertParallelPlan:
    """Shard every MoE layer of `model` over `mesh.expert_group` in place; idempotent per mesh.

    reduce_router_counts: give each layer a `count_reduce` summing token counts over the world, so the
    load-balancing loss and the expert-load statistics are those of the global micro-batch (the values
    one process would compute on the same global batch). False keeps per-rank counts (plain DDP's).
    """
    layers = moe_layers(model)
    check_layout(mesh.world_size, mesh.expert_parallel_size, [m.num_experts for m in layers])
    plan = ExpertParallelPlan(mesh)
    layer_names = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        start, stop = mesh.local_expert_range(layer.num_experts)
        if getattr(layer, "_expert_parallel_mesh", None) is not mesh:
            if getattr(layer, "_expert_parallel_mesh", None) is not None:
                raise RuntimeError("apply_expert_parallel was already applied to this model with another mesh.")
            _shard_experts(layer, start, stop, mesh)
            layer.dispatcher = AllToAllDispatcher(layer.num_experts, stop - start, start, mesh.expert_group)
            layer.count_reduce = AllReduceSum(mesh.world_group) if reduce_router_counts else None  # type: ignore[attr-defined]
            layer._expert_parallel_mesh = mesh  # type: ignore[attr-defined]
        prefix = layer_names[id(layer)]
        prefix = f"{prefix}.experts." if prefix else "experts."
        for pname, _ in layer.experts.named_parameters():
            plan.expert_params[prefix + pname] = (layer.num_experts, start, stop)
    return plan


@torch.no_grad()
def _shard_experts(layer: MoE, start: int, stop: int, mesh: ExpertParallelMesh) -> None:
    experts = layer.experts
    E = layer.num_experts
    for name, p in list(experts.named_parameters(recurse=False)):
        if p.shape[0] != E:
            raise RuntimeError(
                f"expert parameter {name} has leading dimension {p.shape[0]}, expected the number of experts {E}: "
                "expert weights must be stacked [E, ...] to be sharded."
            )
        local = p.detach()[start:stop].clone().contiguous()
        if mesh.expert_data_group is not None and mesh.data_parallel_size > 1 and not local.is_meta:
            # (meta experts are initialised later by materialise.py, the same on every replica)
            src = mesh.expert_data_group_ranks()[0]
            dist.broadcast(local, src=src, group=mesh.expert_data_group)
        setattr(experts, name, nn.Parameter(local, requires_grad=p.requires_grad))
    experts.num_experts = stop - start
    experts.expert_offset = start  # type: ignore[attr-defined]
