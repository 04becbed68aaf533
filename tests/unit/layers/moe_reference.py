"""Slow, obvious references for the MoE layer, shared by the layer tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_plugin.layers.experts import experts_loop
from moe_plugin.layers.moe import MoE


def dense_moe_reference(moe: MoE, x: torch.Tensor, keep_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Compute EVERY expert on EVERY token, then mix by the router's combine weights (zero off the top-k).

    keep_TK masks dropped copies (capacity); the router is the module's own, run once more.
    """
    x_TD = x.reshape(-1, x.shape[-1])
    routing = moe.router(x_TD)
    E = moe.num_experts
    probs_TK = routing.probs_TK if keep_TK is None else routing.probs_TK * keep_TK
    weights_TE = torch.zeros(x_TD.shape[0], E, dtype=probs_TK.dtype).scatter_add(1, routing.topk_ids_TK, probs_TK)
    ex = moe.experts
    out_TD = torch.zeros_like(x_TD)
    for e in range(E):
        y_TD = (F.silu(x_TD @ ex.w_gate_EDF[e]) * (x_TD @ ex.w_up_EDF[e])) @ ex.w_down_EFD[e]
        out_TD = out_TD + weights_TE[:, e : e + 1].to(y_TD.dtype) * y_TD
    if moe.shared_experts is not None:
        out_TD = out_TD + moe._shared(x_TD)
    return out_TD.reshape(x.shape)


def loop_moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Sort copies by expert with a Python loop, run `experts_loop`, scatter back token by token."""
    x_TD = x.reshape(-1, x.shape[-1])
    routing = moe.router(x_TD)
    T, K = routing.topk_ids_TK.shape
    copies = sorted((int(routing.topk_ids_TK[t, k]), t, k) for t in range(T) for k in range(K))
    counts = torch.bincount(routing.topk_ids_TK.flatten(), minlength=moe.num_experts)
    x_ND = torch.stack([x_TD[t] for _, t, _ in copies])
    ex = moe.experts
    y_ND = experts_loop(x_ND, counts, ex.w_gate_EDF, ex.w_up_EDF, ex.w_down_EFD)
    rows = [torch.zeros_like(x_TD[0]) for _ in range(T)]
    for n, (_, t, k) in enumerate(copies):
        rows[t] = rows[t] + routing.probs_TK[t, k].to(y_ND.dtype) * y_ND[n]
    out_TD = torch.stack(rows)
    if moe.shared_experts is not None:
        out_TD = out_TD + moe._shared(x_TD)
    return out_TD.reshape(x.shape)


def small_moe(**kw) -> MoE:
    """A seeded MoE(16, 8 experts top-2, F 12) with a router strong enough that top-k choices are not near-ties."""
    torch.manual_seed(0)
    args = {"num_experts": 8, "top_k": 2, "expert_hidden_size": 12}
    args.update(kw)
    m = MoE(16, **args)
    with torch.no_grad():
        m.router.weight.normal_(std=0.5)
    return m
