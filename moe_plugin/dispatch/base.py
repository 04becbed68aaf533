"""The token-dispatcher interface: how expert-sorted token copies reach the experts' owners and come back.

Shapes: E global experts (the router's), E_local experts on this rank, N token copies produced on this
rank sorted by GLOBAL expert id, M copies this rank's local experts receive (from every rank), D hidden.

The MoE layer (layers/moe.py) calls, for every forward:

    x_MD, tokens_per_local_expert_L = dispatcher.dispatch(x_ND, tokens_per_expert_E)
    y_MD = experts(x_MD, tokens_per_local_expert_L)
    y_ND = dispatcher.combine(y_MD)

Contract (what an implementation must guarantee; tests/unit/dispatch/ checks it for LocalDispatcher and
the expert-parallel helper checks its all-to-all dispatcher against it):

- dispatch(x_ND, tokens_per_expert_E):
    x_ND rows are grouped by global expert id in increasing order, tokens_per_expert_E[e] of them for
    expert e (int64, on x's device, length E = the router's num_experts). Returns the copies for this
    rank's local experts grouped by LOCAL expert id (global id - local_expert_offset) in increasing
    order, and tokens_per_local_expert_L (int64, length E_local, summing to M). Inside one local expert,
    the order of copies is implementation-defined (all-to-all puts source rank 0's first).
- combine(y_MD): the inverse of the LAST dispatch on this dispatcher: returns y_ND with row n holding the
    expert output for input row n. Must be differentiable (autograd flows through both calls).
- Both are collective on the expert-parallel group: every rank calls them in the same order, even with
    N = 0 or M = 0 (an expert with no tokens must not hang a rank).
- Stateless between (dispatch, combine) pairs apart from what combine needs; one dispatcher object per
    MoE layer, so layers can interleave under activation checkpointing only if the implementation keeps
    the state per call (LocalDispatcher has none).

Expert-parallel layout (what parallel/ sets up, from outside the layer):
- The router stays global: it scores all E experts on every rank, and the losses use global counts.
- `moe.experts` is replaced by `GroupedExperts(num_experts=E_local, expert_offset=rank_in_ep * E_local)`
  holding the slices [offset, offset + E_local) of the stacked weights; experts are saved by global id.
- `moe.dispatcher` is set to the all-to-all dispatcher, whose num_local_experts / local_expert_offset
  must match the experts module (MoE checks this at forward).
- `moe.count_reduce` may be set to a callable summing a tensor over the data-parallel group
  (see dispatch/reduce.py); the global-batch balance loss uses it. Layers never call collectives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class TokenDispatcher(ABC):
    """Moves expert-sorted token copies to the ranks that hold their experts and back."""

    def __init__(self, num_experts: int, num_local_experts: int, local_expert_offset: int = 0) -> None:
        if num_local_experts < 1 or num_experts % num_local_experts:
            raise ValueError(
                f"num_local_experts={num_local_experts} must be >= 1 and divide num_experts={num_experts} "
                "(num_experts must be divisible by the expert-parallel size)."
            )
        if not 0 <= local_expert_offset <= num_experts - num_local_experts:
            raise ValueError(
                f"local_expert_offset={local_expert_offset} out of range for {num_local_experts} local experts "
                f"of {num_experts}."
            )
        self.num_experts = num_experts
        self.num_local_experts = num_local_experts
        self.local_expert_offset = local_expert_offset

    @abstractmethod
    def dispatch(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies for this rank's local experts (grouped by local expert) and the count per local expert."""

    @abstractmethod
    def combine(self, y_MD: torch.Tensor) -> torch.Tensor:
        """Inverse of the last dispatch: expert outputs back in the caller's global-expert-sorted order."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_experts={self.num_experts}, num_local_experts={self.num_local_experts}, "
            f"local_expert_offset={self.local_expert_offset})"
        )
