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
from typing import Any

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
    """out_TD[t] = sum_k probs_TK[t, k] * y_ND[copy of (t, k)]; dropped copies contribute nothing."""
    if state.dropless:
        return _DroplessCombine.apply(y_ND, probs_TK.to(y_ND.dtype), state)  # type: ignore[no-any-return]
    return unpermute_reference(y_ND, probs_TK, state)


# Rows per block of the combine backward: the gathered output-gradient block (rows x D) stays in cache
# while it is both scaled into dy and dotted with y.
_COMBINE_BLOCK_ROWS = 2048


class _DroplessCombine(torch.autograd.Function):
    """Dropless combine with a gather-only backward (order_N is a permutation: no accumulation needed).

        forward:   out_TD[t]   = sum_k p[t,k] * y_ND[pos[t,k]]              (embedding_bag, K copies a bag)
        backward:  dy_ND[n]    = p_N[n] * dout_TD[token(n)]                  (p_N = p in sorted order)
                   dp_N[n]     = <dout_TD[token(n)], y_ND[n]>,   dp_TK = dp_N in token order

    Why: autograd of embedding_bag zero-fills an N x D gradient and scatter-adds into it, and computes dp
    with another gather: about 3x the memory traffic of this backward (measured: 64 experts top-6, 4096
    tokens, D 256, 1 thread: ~19 ms of a ~230 ms layer pass went there). Reference: unpermute_reference.
    """

    @staticmethod
    def forward(ctx: Any, y_ND: torch.Tensor, probs_TK: torch.Tensor, state: PermuteState) -> torch.Tensor:  # type: ignore[override]
        sorted_pos_N = torch.empty_like(state.order_N)
        sorted_pos_N[state.order_N] = torch.arange(state.order_N.numel(), device=state.order_N.device)
        ctx.save_for_backward(y_ND, probs_TK)
        ctx.state = state
        # One fused gather-weight-sum; each token's K copies form a bag. No N x D temporary for y * w.
        return F.embedding_bag(
            sorted_pos_N.view(state.num_tokens, state.top_k), y_ND, per_sample_weights=probs_TK, mode="sum"
        )

    @staticmethod
    def backward(ctx: Any, dout_TD: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        y_ND, probs_TK = ctx.saved_tensors
        state: PermuteState = ctx.state
        need_y, need_p = ctx.needs_input_grad[:2]
        dout_TD = dout_TD.contiguous()
        N, D = y_ND.shape
        probs_N = probs_TK.flatten()[state.order_N]
        dy_ND = y_ND.new_empty(N, D) if need_y else None
        dp_N = probs_N.new_empty(N) if need_p else None
        for s in range(0, N, _COMBINE_BLOCK_ROWS):
            t = min(s + _COMBINE_BLOCK_ROWS, N)
            idx_n = state.token_idx_N[s:t]
            if dy_ND is not None:  # gathered straight into dy's rows, then scaled in place
                g_nD = torch.index_select(dout_TD, 0, idx_n, out=dy_ND[s:t])
            else:
                g_nD = dout_TD.index_select(0, idx_n)
            if dp_N is not None:  # before the scaling below
                torch.sum(g_nD * y_ND[s:t], dim=1, out=dp_N[s:t])
            if dy_ND is not None:
                g_nD.mul_(probs_N[s:t, None])
        dp_TK = None
        if dp_N is not None:
            dp_TK = torch.empty_like(probs_N)
            dp_TK[state.order_N] = dp_N
            dp_TK = dp_TK.view_as(probs_TK)
        return dy_ND, dp_TK, None


def unpermute_reference(y_ND: torch.Tensor, probs_TK: torch.Tensor, state: PermuteState) -> torch.Tensor:
    """The obvious form (used with capacity drops, and as the test reference): weighted index_add."""
    weights_N = probs_TK.flatten()[state.order_N].to(y_ND.dtype)
    out_TD = y_ND.new_zeros(state.num_tokens, y_ND.shape[1])
    return out_TD.index_add(0, state.token_idx_N, y_ND * weights_N[:, None])
