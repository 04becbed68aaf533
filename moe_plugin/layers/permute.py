"""Local token permutation: group token copies by expert (with an optional capacity), and the inverse
weighted scatter.

Shapes: T tokens, D hidden, K experts per token, E experts, N kept token copies (N = T*K when dropless).

sort_by_expert: topk_ids_TK -> the order of the kept copies sorted by expert id (stable: token order inside
            an expert), tokens_per_expert_E (kept copies), routed_tokens_per_expert_E (before drops), PermuteState
permute:    sort_by_expert, then x_TD -> x_ND (the rows of the sorted copies); the fused local CPU path
            (kernels/local_moe.py) takes sort_by_expert's output and never materialises x_ND
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

from moe_plugin.kernels.token_rows import dropless_combine, dropless_gather

DROP_POLICIES = ("probs", "position")


@dataclass
class PermuteState:
    """What unpermute needs to put expert outputs back in token order."""

    order_N: torch.Tensor  # position in the flattened [T*K] assignment list of each kept sorted copy
    token_idx_N: torch.Tensor  # source token of each kept sorted copy
    num_tokens: int
    top_k: int
    dropless: bool  # every copy kept: order_N is a permutation of range(T*K)
    _positions_TK: torch.Tensor | None = None

    def positions_TK(self) -> torch.Tensor:
        """Dropless only: the sorted position of each (token, k) copy, the inverse of order_N (computed once)."""
        if self._positions_TK is None:
            pos_N = torch.empty_like(self.order_N)
            pos_N[self.order_N] = torch.arange(self.order_N.numel(), device=self.order_N.device)
            self._positions_TK = pos_N.view(self.num_tokens, self.top_k)
        return self._positions_TK


@dataclass
class Permutation:
    """Where each kept copy goes, without moving any data (`sort_by_expert`)."""

    tokens_per_expert_E: torch.Tensor  # kept copies per expert (what the experts compute)
    routed_tokens_per_expert_E: torch.Tensor  # routed copies per expert, before capacity drops
    state: PermuteState

    @property
    def num_dropped(self) -> torch.Tensor:
        return self.routed_tokens_per_expert_E.sum() - self.tokens_per_expert_E.sum()


@dataclass
class Permuted(Permutation):
    x_ND: torch.Tensor  # the kept copies' rows, grouped by expert


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
    """`sort_by_expert`, then gather the kept copies' rows of x_TD into x_ND."""
    p = sort_by_expert(topk_ids_TK, num_experts, probs_TK, capacity, drop_policy)
    if p.state.dropless:  # every token has K copies: the backward sums them with a gather (kernels/token_rows.py)
        x_ND = dropless_gather(x_TD, p.state.token_idx_N, p.state.positions_TK())
    else:
        # index_select, not x_TD[idx]: its backward is index_add, several times faster on CPU than the
        # index_put(accumulate=True) that advanced indexing differentiates to.
        x_ND = x_TD.index_select(0, p.state.token_idx_N)
    return Permuted(p.tokens_per_expert_E, p.routed_tokens_per_expert_E, p.state, x_ND)


def sort_by_expert(
    topk_ids_TK: torch.Tensor,
    num_experts: int,
    probs_TK: torch.Tensor | None = None,
    capacity: int | None = None,
    drop_policy: str = "probs",
) -> Permutation:
    """The kept copies sorted by expert id (stable), their source tokens and the counts; no data moves."""
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
    state = PermuteState(order_N, token_idx_N, topk_ids_TK.shape[0], K, dropless=capacity is None)
    return Permutation(kept_E, routed_E, state)


def unpermute(y_ND: torch.Tensor, probs_TK: torch.Tensor, state: PermuteState) -> torch.Tensor:
    """out_TD[t] = sum_k probs_TK[t, k] * y_ND[copy of (t, k)]; dropped copies contribute nothing.

    Dropless: one gather-weight-sum per token with a gather-only backward (kernels/token_rows.py: autograd of
    embedding_bag zero-fills an N x D gradient and scatter-adds into it, about 3x the memory traffic)."""
    if state.dropless:
        return dropless_combine(y_ND, probs_TK, state.order_N, state.positions_TK())
    return unpermute_reference(y_ND, probs_TK, state)


def unpermute_reference(y_ND: torch.Tensor, probs_TK: torch.Tensor, state: PermuteState) -> torch.Tensor:
    """The obvious form (used with capacity drops, and as the test reference): weighted index_add."""
    weights_N = probs_TK.flatten()[state.order_N].to(y_ND.dtype)
    out_TD = y_ND.new_zeros(state.num_tokens, y_ND.shape[1])
    return out_TD.index_add(0, state.token_idx_N, y_ND * weights_N[:, None])
