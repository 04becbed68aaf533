"""Local token permutation: group token copies by expert (with an optional capacity), and the inverse
weighted scatter.

Shapes: T tokens, D hidden, K experts per token, E experts, N kept token copies (N = T*K when dropless).

permute:    x_TD, topk_ids_TK -> x_ND sorted by expert id (stable: token order inside an expert),
            tokens_per_expert_E (kept copies), routed_tokens_per_expert_E (before drops), PermuteState
unpermute:  y_ND, probs_TK    -> out_TD[t] = sum_k probs[t,k] * y[copy of (t,k)]     (dropped copies add 0)

Capacity (GShard, Switch): with capacity C = ceil(capacity_factor * T * K / E), each expert keeps at
most C copies; the rest are dropped and the token keeps only its other experts' outputs (plus the shared
experts and the residual). Which copies an overloaded expert keeps:
    "probs":    the C with the largest routing weight (Megatron's "probs" drop policy)
    "position": the C earliest tokens in the batch (GShard, Megatron's "position")
Dropless (capacity None) never pads an expert: every expert gets exactly its routed copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DROP_POLICIES = ("probs", "position")


@dataclass
class PermuteState:
    """What unpermute needs to put expert outputs back in token order."""

    order_N: torch.Tensor  # position in the flattened [T*K] assignment list of each kept sorted copy
    token_idx_N: torch.Tensor  # source token of each kept sorted copy
    num_tokens: int
    top_k: int
    dropless: bool  # every copy kept: order_N is a permutation of range(T*K)


@dataclass
class Permuted:
    x_ND: torch.Tensor
    tokens_per_expert_E: torch.Tensor  # kept copies per expert (what the experts compute)
    routed_tokens_per_expert_E: torch.Tensor  # routed copies per expert, before capacity drops
    state: PermuteState

    @property
    def num_dropped(self) -> torch.Tensor:
        return self.routed_tokens_per_expert_E.sum() - self.tokens_per_expert_E.sum()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * T * K / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def permute(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    num_experts: int,
    probs_TK: torch.Tensor | None = None,
    capacity: int | None = None,
    drop_policy: str = "probs",
) -> Permuted:
    K = topk_ids_TK.shape[1]
    flat_ids_N = topk_ids_TK.flatten()
    routed_E = torch.bincount(flat_ids_N, minlength=num_experts)
    if capacity is None:
        order_N = torch.argsort(flat_ids_N, stable=True)
        kept_E = routed_E
    else:
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy={drop_policy!r} must be one of {DROP_POLICIES}.")
        if drop_policy == "probs":
            if probs_TK is None:
                raise ValueError("drop_policy='probs' needs probs_TK.")
            # Sort by weight (descending), then stably by expert: inside an expert, best copies first.
            by_prob_N = torch.argsort(probs_TK.detach().flatten(), descending=True, stable=True)
            order_N = by_prob_N[torch.argsort(flat_ids_N[by_prob_N], stable=True)]
        else:
            order_N = torch.argsort(flat_ids_N, stable=True)
        starts_E = torch.cumsum(routed_E, dim=0) - routed_E
        sorted_ids_N = flat_ids_N[order_N]
        rank_in_expert_N = torch.arange(order_N.numel(), device=order_N.device) - starts_E[sorted_ids_N]
        order_N = order_N[rank_in_expert_N < capacity]
        kept_E = routed_E.clamp_max(capacity)
    token_idx_N = order_N // K
    # index_select, not x_TD[idx]: its backward is index_add, several times faster on CPU than the
    # index_put(accumulate=True) that advanced indexing differentiates to.
    x_ND = x_TD.index_select(0, token_idx_N)
    state = PermuteState(order_N, token_idx_N, x_TD.shape[0], K, dropless=capacity is None)
    return Permuted(x_ND, kept_E, routed_E, state)


def unpermute(y_ND: torch.Tensor, probs_TK: torch.Tensor, state: PermuteState) -> torch.Tensor:
    """out_TD[t] = sum_k probs_TK[t, k] * y_ND[copy of (t, k)]; dropped copies contribute nothing."""
    if state.dropless:
        # One fused gather-weight-sum (embedding_bag with per-sample weights): each token's K copies form
        # a bag. No N x D temporary for y * w and no index_add; its backward is a fused kernel too
        # (a hand-written backward of gather + multiply + dot was slower and used 2.5x the memory on CPU).
        sorted_pos_N = torch.empty_like(state.order_N)
        sorted_pos_N[state.order_N] = torch.arange(state.order_N.numel(), device=state.order_N.device)
        return F.embedding_bag(
            sorted_pos_N.view(state.num_tokens, state.top_k),
            y_ND,
            per_sample_weights=probs_TK.to(y_ND.dtype),
            mode="sum",
        )
    return unpermute_reference(y_ND, probs_TK, state)


def unpermute_reference(y_ND: torch.Tensor, probs_TK: torch.Tensor, state: PermuteState) -> torch.Tensor:
    """The obvious form (used with capacity drops, and as the test reference): weighted index_add."""
    weights_N = probs_TK.flatten()[state.order_N].to(y_ND.dtype)
    out_TD = y_ND.new_zeros(state.num_tokens, y_ND.shape[1])
    return out_TD.index_add(0, state.token_idx_N, y_ND * weights_N[:, None])
