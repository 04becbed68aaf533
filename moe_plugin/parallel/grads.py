"""Gradient reduction and clipping for expert parallelism.

Vocabulary: W world size (every rank reads distinct data), EP expert-parallel size, DP = W / EP
replicas of each expert, L_r the mean loss of rank r's micro-batch, L = (1/W) sum_r L_r the loss of the
global batch (equal micro-batch sizes).

Dense parameter theta (replicated on every rank): DDP averages, grad = (1/W) sum_r dL_r/dtheta.

Expert parameter phi held by the EP ranks' owner j: after backward through the all-to-all, the owner's
local gradient already holds sum over its expert group of dL_r/dphi (every rank of the group sent its
tokens to j and got the gradients back). Summing over the DP replicas of phi (the expert-data-parallel
group) gives sum over ALL W ranks, and dividing by W gives dL/dphi:

    grad(phi) = (1/W) * sum_{expert-data-parallel group} local_grad(phi)

which equals the single-process gradient for the same global batch (DeepSpeed-MoE and Megatron-Core
use the same rule). Expert parameters are therefore excluded from DDP: averaging them over all ranks
would mix different experts (different EP ranks hold different experts under the same name).

Clipping by global norm must see every expert once: with experts partitioned over the expert group and
replicated over the expert-data-parallel group,

    ||g||^2 = sum_dense ||g_i||^2 + sum_{expert group} sum_local_experts ||g_j||^2
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def exclude_from_ddp(module: nn.Module, names: Iterable[str]) -> None:
    """Tell DDP (built later on `module`) not to all-reduce or broadcast these parameters.

    Names are fully qualified relative to `module`. DDP ignores a parameter set directly on the module
    passed to it only by name; experts live in submodules, so the names resolve.
    """
    names = list(names)
    known = dict(module.named_parameters())
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"cannot exclude unknown parameters from DDP: {missing[:3]}")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def reduce_expert_gradients(
    params: list[nn.Parameter], expert_data_group: dist.ProcessGroup | None, world_size: int
) -> None:
    """grad <- (sum of grad over the expert-data-parallel group) / world_size, in one flat all_reduce.

    A parameter without a gradient contributes zeros: every rank calls the same collective whatever the
    routing did (an expert that received no tokens anywhere still takes part).
    """
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if dist.is_initialized() and dist.get_world_size(expert_data_group) > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=expert_data_group)
    flat.div_(world_size)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        chunk = flat[offset : offset + n].view_as(g)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n


@torch.no_grad()
def clip_grad_norm_expert_parallel(
    dense_params: list[torch.Tensor],
    expert_params: list[torch.Tensor],
    max_norm: float,
    expert_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """In-place clip by the global 2-norm of all gradients (torch.nn.utils.clip_grad_norm_'s formula).

        coef = min(1, max_norm / (||g|| + 1e-6)),   g <- coef * g

    Expert norms are summed over the expert group (call after reduce_expert_gradients). Returns ||g||.
    """
    dense = [p.grad for p in dense_params if p.grad is not None]
    experts = [p.grad for p in expert_params if p.grad is not None]
    ref = (dense or experts or [torch.zeros(1)])[0]
    zero = torch.zeros((), dtype=torch.float32, device=ref.device)
    dense_sq = sum((g.detach().float().pow(2).sum() for g in dense), zero)
    expert_sq = sum((g.detach().float().pow(2).sum() for g in experts), zero.clone())
    if dist.is_initialized() and dist.get_world_size(expert_group) > 1:
        dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=expert_group)
    total = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in dense + experts:
        g.mul_(coef.to(g.dtype))
    return total


@torch.no_grad()
def broadcast_dense_states(module: nn.Module, skip: set[str], src: int = 0) -> None:
    """Broadcast every parameter and buffer except `skip` from rank `src` (what DDP does at wrap time).

    Used when a model is not wrapped in DDP (validate/test/predict): sharded experts must not be
    overwritten with rank 0's experts.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    tensors = [t for n, t in list(module.named_parameters()) + list(module.named_buffers()) if n not in skip]
    for t in tensors:
        dist.broadcast(t.data, src=src)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2's sharded parameters and gradients), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm_sharded(
    dense_params: list[torch.Tensor],
    expert_params: list[torch.Tensor],
    max_norm: float,
    dense_replicas: int,
    expert_replicas: int,
) -> torch.Tensor:
    """Global-norm clipping when gradients are FSDP2 shards (DTensors on two different meshes).

    Each rank holds a distinct shard of the dense gradients, repeated on `dense_replicas` = R ranks, and a
    distinct shard of its experts' gradients, repeated on `expert_replicas` = ER ranks. One all_reduce
    over the world of (sum of dense shard squares, sum of expert shard squares) counts each value R
    (resp. ER) times, hence

        ||g||^2 = allreduce(dense_sq) / R + allreduce(expert_sq) / ER,   coef = min(1, max_norm / (||g|| + 1e-6))

    (torch.nn.utils.clip_grad_norm_'s formula, computed in float32). Returns ||g||.
    """
    dense = [_local(p.grad) for p in dense_params if p.grad is not None]
    experts = [_local(p.grad) for p in expert_params if p.grad is not None]
    ref = (dense or experts or [torch.zeros(1)])[0]
    sq = torch.zeros(2, dtype=torch.float32, device=ref.device)
    for g in dense:
        sq[0] += g.detach().float().pow(2).sum()
    for g in experts:
        sq[1] += g.detach().float().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    total = (sq[0] / dense_replicas + sq[1] / expert_replicas).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in dense + experts:
        g.mul_(coef.to(g.dtype))
    return total
