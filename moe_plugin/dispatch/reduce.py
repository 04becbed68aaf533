"""Count reduction over the data-parallel group, for the global-batch balance loss and the expert bias.

Shapes: E experts.

`AllReduceSum(group)` is a callable `tokens_per_expert_E -> sum over the group's ranks` that the
parallel layer assigns to `MoE.count_reduce`; the layer calls it without knowing about collectives.
Counts carry no gradient, so a plain all_reduce suffices.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class AllReduceSum:
    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return counts
        out = counts.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def __repr__(self) -> str:
        return f"AllReduceSum(group={self.group})"
