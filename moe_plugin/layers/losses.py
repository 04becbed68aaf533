"""Router auxiliary losses and routing statistics, each a pure function of tensors passed in.

Shapes: T tokens, B sequences, S tokens per sequence (T = B*S), E experts, K experts per token.

Nothing here communicates. The global-batch loss takes tokens-per-expert counts that the caller has
already summed over micro-batches and data-parallel ranks (see MoE.count_reduce), so the value does not
depend on the parallel layout.

`scores` must sum to 1 over experts (softmax scores; sigmoid scores divided by their sum, as
DeepSeek-V3 and Megatron do for the balance loss).
"""

from __future__ import annotations

import torch


def tokens_per_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of token assignments each expert receives, shape [E] (int64)."""
    return torch.bincount(topk_ids_TK.flatten(), minlength=num_experts)


def load_balancing_loss(scores_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balancing loss (Fedus et al. 2021, eq. 4; Lepikhin et al. 2020).

        L_balance = E * sum_i f_i * P_i,      f_i = c_i / sum_j c_j,      P_i = mean_t scores_ti

    c_i = token assignments routed to expert i (no gradient; before any capacity drop), so f sums to 1;
    P_i = mean router score of expert i over the T tokens. Equals 1 for perfectly uniform routing, E for
    full collapse on one expert. With micro-batch counts this is the per-micro-batch Switch loss; with
    counts summed over the data-parallel group and the gradient-accumulation micro-batches of the step it
    is the global-batch loss of Qiu et al. 2025 ("Demons in the Detail"), P staying local (data-parallel
    gradient averaging makes it global).
    Megatron writes the same quantity as E / (K * T^2) * sum_i (sum_t scores_ti) * c_i; transformers'
    `load_balancing_loss_func` returns K times this value (its f sums to K).
    """
    E = scores_TE.shape[-1]
    counts_E = tokens_per_expert_E.detach().to(scores_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    P_E = scores_TE.mean(dim=0)
    return E * torch.sum(f_E * P_E)


def sequence_load_balancing_loss(scores_BSE: torch.Tensor, topk_ids_BSK: torch.Tensor) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V3, eq. 17-20), averaged over the B sequences.

        L_seq = mean_b E * sum_i f_bi * P_bi,   f_bi = c_bi / (S*K),   P_bi = mean_s scores_bsi

    Balances every sequence, not only the batch: stricter than the micro-batch loss, used with a small
    coefficient next to aux-loss-free balancing.
    """
    B, S, E = scores_BSE.shape
    K = topk_ids_BSK.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=scores_BSE.dtype, device=scores_BSE.device)
    counts_BE.scatter_add_(
        1, topk_ids_BSK.reshape(B, S * K), torch.ones_like(topk_ids_BSK, dtype=scores_BSE.dtype).reshape(B, S * K)
    )
    f_BE = counts_BE / (S * K)
    P_BE = scores_BSE.mean(dim=1)
    return E * (f_BE * P_BE).sum(dim=-1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): L_z = mean_t (logsumexp_i logits_ti)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


def router_entropy(scores_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the routing distribution, H = mean_t -sum_i p_ti log p_ti (nats).

    log(E) for uniform scores, 0 for one-hot; scores are renormalised to sum to 1 first.
    """
    p_TE = scores_TE.float() / scores_TE.float().sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return -(p_TE * torch.log(p_TE.clamp_min(1e-20))).sum(dim=-1).mean()
