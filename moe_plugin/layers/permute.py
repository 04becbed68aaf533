"""Local token permutation: group token copies by expert, and the inverse weighted scatter.

Shapes: T tokens, D hidden, K experts per token, E experts, N = T*K token copies.

permute:    x_TD, topk_ids_TK -> x_ND sorted by expert id, tokens_per_expert_E, token_idx_N, order_N
unpermute:  y_ND, probs_TK    -> out_TD[t] = sum_k probs[t,k] * y[copy of (t,k)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PermuteState:
    """What unpermute needs to put expert outputs back in token order."""

    order_N: torch.Tensor  # position in the flattened [T*K] assignment list of each sorted copy
    token_idx_N: torch.Tensor  # source token of each sorted copy
    num_tokens: int


def permute(
    x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, PermuteState]:
    K = topk_ids_TK.shape[1]
    flat_ids_N = topk_ids_TK.flatten()
    order_N = torch.argsort(flat_ids_N, stable=True)
    token_idx_N = order_N // K
    tokens_per_expert_E = torch.bincount(flat_ids_N, minlength=num_experts)
    return x_TD[token_idx_N], tokens_per_expert_E, PermuteState(order_N, token_idx_N, x_TD.shape[0])


def unpermute(y_ND: torch.Tensor, probs_TK: torch.Tensor, state: PermuteState) -> torch.Tensor:
    weights_N = probs_TK.flatten()[state.order_N].to(y_ND.dtype)
    out_TD = y_ND.new_zeros(state.num_tokens, y_ND.shape[1])
    return out_TD.index_add(0, state.token_idx_N, y_ND * weights_N[:, None])
