"""One group layout for DeepSpeed and our dispatcher: DeepSpeed's expert groups as our ExpertParallelMesh.

Vocabulary: W world size, EP expert-parallel size, DP = W / EP expert-data-parallel size.

DeepSpeed keeps its expert process groups in `deepspeed.utils.groups`, named "ep_size_<EP>":

    _create_expert_and_data_parallel(EP)    expert groups      {dp_rank * EP + j : j < EP}   (all-to-all)
                                            expert-data groups {i * EP + ep_rank : i < DP}   (ZeRO reduces
                                                                                              and partitions
                                                                                              expert state)

which is exactly parallel/mesh.py's DP x EP grid (expert axis fastest). `build_deepspeed_expert_mesh`
creates the groups ONCE through DeepSpeed and hands the same ProcessGroup objects to an ExpertParallelMesh,
so DeepSpeed's ZeRO optimizer and our AllToAllDispatcher talk over the same groups; it checks the ranks
against mesh.py's formulas so a future change on either side fails loudly instead of mixing experts.

`mark_expert_parameters` gives every sharded expert parameter DeepSpeed's MoE attributes:

    param.allreduce = False                 -> deepspeed.moe.utils.is_moe_param(param) is True
    param.group_name = "ep_size_<EP>"       -> ZeRO reduces/partitions it over that expert-data group
    (ZeRO-3) param.ds_zero_placement_family = "autoep_expert"
                                            -> ZeRO-3 partitions it over the expert-data group and averages
                                               its gradient by W (DeepSpeed's expert placement family)

and `split_moe_param_groups` splits an optimizer's parameter groups into dense and MoE groups
(`split_params_into_different_moe_groups_for_optimizer`, in place) so ZeRO sees the 'moe' groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_plugin.parallel.mesh import (
    ExpertParallelMesh,
    check_layout,
    expert_data_group_ranks,
    expert_group_ranks,
)

EXPERT_PLACEMENT_FAMILY = "autoep_expert"  # DeepSpeed ZeRO-3's name for parameters partitioned over expert-data groups


def group_name(expert_parallel_size: int) -> str:
    """DeepSpeed's name for the expert groups of size EP (deepspeed.utils.groups)."""
    return f"ep_size_{expert_parallel_size}"


def build_deepspeed_expert_mesh(expert_parallel_size: int) -> ExpertParallelMesh:
    """Create (or reuse) DeepSpeed's expert groups for EP and return them as our mesh (collective, every rank).

    Needs an initialised default process group (deepspeed.init_distributed). Raises LayoutError for an
    impossible layout before any group is created.
    """
    from deepspeed.utils import groups

    world, rank = dist.get_world_size(), dist.get_rank()
    check_layout(world, expert_parallel_size)
    name = group_name(expert_parallel_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(expert_parallel_size)
    mesh = ExpertParallelMesh(
        world,
        rank,
        expert_parallel_size,
        groups._get_expert_parallel_group(name),
        groups._get_expert_data_parallel_group(name),
        dist.group.WORLD,
    )
    ep_ranks = list(groups._get_expert_parallel_group_ranks(name))
    edp_ranks = list(groups._get_expert_data_parallel_group_ranks(name))
    if ep_ranks != mesh.expert_group_ranks() or edp_ranks != mesh.expert_data_group_ranks():
        raise RuntimeError(
            f"DeepSpeed's expert groups for {name} on rank {rank} are expert {ep_ranks} / expert-data {edp_ranks}, "
            f"but moe_plugin's mesh expects {expert_group_ranks(world, expert_parallel_size)[mesh.dp_rank]} / "
            f"{expert_data_group_ranks(world, expert_parallel_size)[mesh.ep_rank]}: the two layouts disagree "
            "(was deepspeed.utils.groups initialised with use_data_before_expert_parallel?)."
        )
    return mesh


def mark_expert_parameters(
    module: nn.Module, names: Iterable[str], expert_parallel_size: int, zero_stage: int
) -> list[nn.Parameter]:
    """Give the named parameters DeepSpeed's MoE attributes (see the module docstring); returns them."""
    params = dict(module.named_parameters())
    name = group_name(expert_parallel_size)
    marked = []
    for n in names:
        p = params[n]
        p.allreduce = False  # type: ignore[attr-defined]
        p.group_name = name  # type: ignore[attr-defined]
        if zero_stage == 3:
            p.ds_zero_placement_family = EXPERT_PLACEMENT_FAMILY  # type: ignore[attr-defined]
            p.ds_zero_partition_group_name = name  # type: ignore[attr-defined]
        marked.append(p)
    return marked


def split_moe_param_groups(optimizer: torch.optim.Optimizer, scheduler: Any = None) -> list[int]:
    """Split `optimizer`'s groups into dense and MoE groups in place; returns new group -> original group.

    Dense parameters stay in their group; each group's expert parameters move to a copy of it with
    'moe': True and 'name': "ep_size_<EP>" (DeepSpeed's split). The hyper-parameters of a group (lr,
    weight decay, betas) are copied, so the update is unchanged. An LR scheduler built on the optimizer
    keeps one entry per group in lists (base_lrs, lr_lambdas, ...): those are re-indexed to the new groups.
    Call before the optimizer has state (right after configure_optimizers).
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    if optimizer.state:
        raise RuntimeError("split_moe_param_groups must run before the optimizer has state (before any step).")
    old = optimizer.param_groups
    named = [{**g, "name": f"moe_plugin_group_{i}"} for i, g in enumerate(old)]
    origin_of = {id(p): i for i, g in enumerate(old) for p in g["params"]}
    new = [g for g in split_params_into_different_moe_groups_for_optimizer(named, max_group_size=None) if g["params"]]
    origin = [origin_of[id(g["params"][0])] for g in new]
    for g in new:
        if not g.get("moe"):
            g.pop("name")  # dense groups keep their original keys
    optimizer.param_groups = new
    if scheduler is not None:
        for attr, value in list(vars(scheduler).items()):
            if isinstance(value, list) and len(value) == len(old) and attr != "optimizer":
                setattr(scheduler, attr, [value[i] for i in origin])
    return origin


def torch_optimizer_state(
    states: dict[str, dict[str, torch.Tensor]],
    step: float | None,
    names: list[list[str]],
    hyperparameters: list[dict[str, Any]],
) -> dict[str, Any]:
    """A torch optimizer state_dict (integer ids in `names` order) from per-name state: what a plain
    torch optimizer built by the same configure_optimizers would save (the layout-free format's input)."""
    flat = [n for group in names for n in group]
    index = {n: i for i, n in enumerate(flat)}
    state = {}
    if step is not None:
        state = {index[n]: {"step": torch.tensor(step), **states[n]} for n in flat if n in states}
    groups = [{**h, "params": [index[n] for n in g]} for h, g in zip(hyperparameters, names)]
    return {"state": state, "param_groups": groups}


def regroup_scheduler_state(state: dict[str, Any], origin: list[int], to_original: bool) -> dict[str, Any]:
    """An LR scheduler's state with its per-group lists (base_lrs, _last_lr, lr_lambdas) mapped between the
    split optimizer groups (len(origin)) and the groups configure_optimizers made (max(origin) + 1)."""
    n_split, n_orig = len(origin), max(origin) + 1
    out = dict(state)
    for k, v in state.items():
        if to_original and isinstance(v, list) and len(v) == n_split:
            out[k] = [v[origin.index(o)] for o in range(n_orig)]
        elif not to_original and isinstance(v, list) and len(v) == n_orig:
            out[k] = [v[o] for o in origin]
    return out
