"""Router auxiliary losses, each a pure function of one micro-batch's routing.

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch


def tokens_per_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of token assignments each expert receives, shape [E] (int64)."""
    return torch.bincount(topk_ids_TK.flatten(), minlength=num_experts)


def load_balancing_loss(scores_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balancing loss (Fedus et al. 2021, eq. 4; Lepikhin et al. 2020).

        L_balance = E * sum_i f_i * P_i,      f_i = c_i / sum_j c_j,      P_i = mean_t scores_ti

    c_i = token assignments routed to expert i (no gradient), so f sums to 1; P_i = mean router score of
    expert i over the T tokens. Equals 1 for perfectly uniform routing. Counts summed over data-parallel
    ranks (MoE.count_reduce) give the loss of the global micro-batch; P staying local is exact because
    data-parallel gradient averaging averages P. Megatron writes the same quantity as
    E / (K * T^2) * sum_i (sum_t scores_ti) * c_i.
    """
    E = scores_TE.shape[-1]
    counts_E = tokens_per_expert_E.detach().to(scores_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    P_E = scores_TE.mean(dim=0)
    return E * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean_t (logsumexp_i logits_ti)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
