"""Tiny collectives that make every rank take the same decision (spike guard, straggler monitor).

Collectives live in parallel/ and dispatch/ only; Lightning callbacks call these helpers. Each helper is a
no-op returning the local answer when torch.distributed is not initialised (single process), so callers need
no special case. Tensors are built on `device` because NCCL/HCCL-style backends only reduce device tensors,
while gloo reduces CPU tensors.

Legend: R = number of ranks in `group`, V = number of values per rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def consensus_group(trainer: object) -> dist.ProcessGroup | None:
    """The group a callback's decision must agree over: the strategy's `consensus_group` when it defines one
    (local_sgd: the island, so islands never wait on each other between syncs), else every rank (None)."""
    return getattr(getattr(trainer, "strategy", None), "consensus_group", None)


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def mean_over_ranks(
    values: Sequence[float], device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None
) -> list[float]:
    """Element-wise mean of `values` over the ranks of `group` (one all-reduce of V floats).

    A non-finite value on any rank makes that element non-finite on every rank, which is what a
    "non-finite anywhere means skip everywhere" rule needs.
    """
    if not _distributed(group):
        return [float(v) for v in values]
    t_V = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t_V, op=dist.ReduceOp.SUM, group=group)
    t_V /= dist.get_world_size(group)
    return t_V.tolist()


def all_ranks_agree(flag: bool, device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank iff `flag` is True on at least one rank (one all-reduce with MAX).

    Use it for "skip this step" style decisions: one rank seeing a problem makes all ranks act alike, so
    data-parallel replicas never diverge and no rank waits in a collective the others skipped.
    """
    if not _distributed(group):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def gather_floats(
    values: Sequence[float], device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None
) -> list[list[float]]:
    """Every rank's `values` (a list of R lists of V floats, in rank order), by one all-gather.

    Every rank must pass the same number of values.
    """
    local_V = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if not _distributed(group):
        return [local_V.tolist()]
    out_RV = [torch.empty_like(local_V) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out_RV, local_V, group=group)
    return [t.tolist() for t in out_RV]


def min_over_ranks(
    values: Sequence[int], device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None
) -> list[int]:
    """Element-wise minimum of integer `values` over the ranks of `group` (one all-reduce of V int64).

    Take -x for a maximum in the same call: min_over_ranks([n, -n]) gives (shortest, -longest).
    """
    if not _distributed(group):
        return [int(v) for v in values]
    t_V = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(t_V, op=dist.ReduceOp.MIN, group=group)
    return [int(v) for v in t_V.tolist()]
