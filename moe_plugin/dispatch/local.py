"""LocalDispatcher: every expert lives on this rank, so dispatch and combine move nothing.

Shapes: N token copies sorted by expert id, E experts (global = local), D hidden.

The permutation itself (sort copies by expert, weighted scatter back) is done by the MoE layer
(layers/permute.py) before dispatch and after combine, so that every dispatcher receives the same
expert-sorted input; this class is the identity that the all-to-all dispatcher generalises.
"""

from __future__ import annotations

import torch

from moe_plugin.dispatch.base import TokenDispatcher


class LocalDispatcher(TokenDispatcher):
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
