"""Router auxiliary losses, each a pure function of one micro-batch's routing.

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch


def tokens_per_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of token assignments each expert receives, shape [E] (int64)."""
    return torch.bincount(topk_ids_TK.flatten(), minlength=num_experts)


def load_balancing_loss(scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss (Fedus et al. 2021, eq. 4; Lepikhin et al. 2020).

        L_balance = E * sum_i f_i * P_i

    f_i = fraction of the T*K token assignments routed to expert i (no gradient),
    P_i = mean router score of expert i over the T tokens.
    Equals 1 for perfectly uniform routing. Megatron writes the same quantity as
    E / (K * T^2) * sum_i (sum_t scores_ti) * (tokens to expert i).
    """
    T, K = topk_ids_TK.shape
    f_E = tokens_per_expert(topk_ids_TK, num_experts).to(scores_TE.dtype) / (T * K)
    P_E = scores_TE.mean(dim=0)
    return num_experts * torch.sum(f_E.detach() * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean_t (logsumexp_i logits_ti)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
