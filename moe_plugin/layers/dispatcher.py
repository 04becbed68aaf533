"""The token-dispatcher interface, and the local (default, collective-free) dispatcher.

Shapes: E global experts (the router's), L experts on this rank, N token copies produced on this rank
sorted by GLOBAL expert id, M copies this rank's local experts receive (from every rank), D hidden.

The MoE layer (moe.py) calls, for every forward:

    x_MD, tokens_per_local_expert_L = dispatcher.dispatch(x_ND, tokens_per_expert_E)
    y_MD = experts(x_MD, tokens_per_local_expert_L)
    y_ND = dispatcher.combine(y_MD)

Every MoE layer has a dispatcher: `LocalDispatcher` (every expert on this rank, nothing moves) unless
expert parallelism installs another one from outside (parallel/apply.py installs
moe_plugin.dispatch.AllToAllDispatcher). The interface lives here, beside the layer, because layers
import nothing above them; the collective implementations live in dispatch/ and subclass it.

Contract (tests/unit/dispatch/ checks it for LocalDispatcher; tests/distributed/ checks AllToAllDispatcher
against LocalDispatcher):

- dispatch(x_ND, tokens_per_expert_E):
    x_ND rows are grouped by global expert id in increasing order, tokens_per_expert_E[e] of them for
    expert e (int64, on x's device, length E). Returns the copies for this rank's local experts grouped
    by LOCAL expert id (global id - local_expert_offset) in increasing order, and
    tokens_per_local_expert_L (int64, length L, summing to M; on x's device, or on the host when the
    dispatcher already copied it there, which saves the experts a device->host sync). Inside one local expert the order of
    copies is implementation-defined (all-to-all puts source rank 0's first).
- combine(y_MD): the inverse of the LAST dispatch on this dispatcher: returns y_ND with row n holding the
    expert output for input row n. Differentiable (autograd flows through both calls).
- Both are collective on the expert-parallel group: every rank calls them in the same order, even with
    N = 0 or M = 0 (an expert with no tokens must not hang a rank).
- One dispatcher object per MoE layer, holding at most what combine needs from the last dispatch.

Expert-parallel layout (what parallel/ sets up, from outside the layer):
- The router stays global: it scores all E experts on every rank, and the losses use global counts.
- `moe.experts` holds the slices [offset, offset + L) of the stacked weights (experts saved by global id).
- `moe.dispatcher`'s num_local_experts / local_expert_offset must match the experts module (MoE checks
  this at forward).
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


class LocalDispatcher(TokenDispatcher):
    """Every expert lives on this rank: dispatch and combine are the identity (the default).

    The permutation itself (sort copies by expert, weighted scatter back) is done by the MoE layer
    (permute.py) before dispatch and after combine, so every dispatcher receives the same expert-sorted
    input; this is the case the all-to-all dispatcher generalises.
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__(num_experts, num_local_experts=num_experts, local_expert_offset=0)

    def dispatch(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert has shape {tuple(tokens_per_expert_E.shape)}, expected ({self.num_experts},)."
            )
        return x_ND, tokens_per_expert_E

    def combine(self, y_MD: torch.Tensor) -> torch.Tensor:
        return y_MD
