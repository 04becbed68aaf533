"""Fused local MoE (CPU): permute-gather + SwiGLU experts + weighted combine as ONE autograd node.

Shapes: T tokens, D hidden, K experts per token, E experts (all local), F expert FFN hidden, N = T*K token
copies sorted by expert (dropless); rows offs[e-1]:offs[e] of the sorted order belong to expert e, tok_e are
their source tokens, p_e their combine weights (probs in sorted order).

    forward, per expert e (y_e lives in a small reusable buffer that stays in cache):
        x_e    = x_TD[tok_e]                                  (index_select out= its rows of x_ND, saved)
        g_e    = x_e @ Wg[e],  u_e = x_e @ Wu[e]              (saved, as in swiglu_experts.py)
        y_e    = (p_e * silu(g_e) * u_e) @ Wd[e]              (p folded into h when F <= D, else into y)
        out_TD[tok_e] += y_e                                  (scatter_add_ with an expanded index)
    backward, per expert e:
        dout_e = dout_TD[tok_e]
        r_e    = dout_e @ Wd[e]^T                             (the unweighted dh)
        dp_e   = rowsum(r_e * h_e)        = <dout_e, y_e / p_e>   (no N x D y saved: F-wide dot instead)
        dWd[e] = (p_e * h_e)^T dout_e,    dh_e = p_e * r_e
        du, dg, dWg, dWu, dx_e as in swiglu_experts.py       (x_e: the saved rows of x_ND)
        dx_TD[tok_e] += dx_e                                  (scatter_add_)

Why: the unfused path (layers/permute.py + kernels/swiglu_experts.py) writes and re-reads x_ND, y_ND, dy_ND
and dx_ND, four N x D arrays (N = 6T on the fine shape: 25 MB each at T=4096, D=256, out of cache) and saves
y_ND for the combine backward. Here y_ND, dy_ND and dx_ND never exist; x_ND is written by the per-expert
gathers and saved for the weight gradients (re-gathering it in backward measured slower: the gathers are
latency-bound on random token rows, not bandwidth-bound). Measured on a 2-core Zen 4 CPU it does NOT beat the
unfused path (docs/performance.md, issue 15 fourth pass), so the MoE layer leaves it off by default
(`MoE.fuse_local_routing`).
Reference: permute + experts_loop + unpermute_reference (tests/unit/kernels/test_local_moe.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from moe_plugin.kernels.grouped_mm import compute_dtype, expert_bounds, host_counts, weight_grad_buffer


def local_moe_supported(device: torch.device) -> bool:
    """The fused node is written for CPU caches; accelerators keep the permute + grouped GEMM path."""
    return device.type == "cpu"


class _LocalSwiGLUMoE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_TD: torch.Tensor,
        probs_TK: torch.Tensor,
        w_gate_EDF: torch.Tensor,
        w_up_EDF: torch.Tensor,
        w_down_EFD: torch.Tensor,
        order_N: torch.Tensor,
        token_idx_N: torch.Tensor,
        counts: list[int],
    ) -> torch.Tensor:
        x_TD = x_TD.contiguous()
        (T, D), F_, D_out = x_TD.shape, w_gate_EDF.shape[-1], w_down_EFD.shape[-1]
        N = token_idx_N.numel()
        bounds = expert_bounds(counts)
        probs_N = probs_TK.reshape(-1)[order_N]
        g_NF = x_TD.new_empty(N, F_)
        u_NF = x_TD.new_empty(N, F_)
        out_TD = x_TD.new_zeros(T, D_out)
        rows = max(counts, default=0)
        x_ND = x_TD.new_empty(N, D)  # saved: reading it back in backward streams, a re-gather does not
        y_buf = x_TD.new_empty(rows, D_out)
        scale_h = F_ <= D_out  # weight the narrower of h (n x F) and y (n x D)

        toks, ps, gs, us, xs = (torch.split(t, counts) for t in (token_idx_N, probs_N, g_NF, u_NF, x_ND))
        wg, wu, wd = w_gate_EDF.unbind(0), w_up_EDF.unbind(0), w_down_EFD.unbind(0)
        for e, _, _ in bounds:
            n = counts[e]
            x_nD = torch.index_select(x_TD, 0, toks[e], out=xs[e])
            g_nF = torch.mm(x_nD, wg[e], out=gs[e])
            u_nF = torch.mm(x_nD, wu[e], out=us[e])
            h_nF = F.silu(g_nF).mul_(u_nF)
            p_n1 = ps[e][:, None]
            y_nD = torch.mm(h_nF.mul_(p_n1) if scale_h else h_nF, wd[e], out=y_buf[:n])
            out_TD.scatter_add_(0, toks[e][:, None].expand(n, D_out), y_nD if scale_h else y_nD.mul_(p_n1))
        ctx.bounds, ctx.counts, ctx.probs_shape, ctx.num_tokens = bounds, counts, probs_TK.shape, T
        ctx.save_for_backward(x_ND, probs_N, w_gate_EDF, w_up_EDF, w_down_EFD, g_NF, u_NF, order_N, token_idx_N)
        return out_TD

    @staticmethod
    def backward(ctx: Any, dout_TD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_ND, probs_N, w_gate_EDF, w_up_EDF, w_down_EFD, g_NF, u_NF, order_N, token_idx_N = ctx.saved_tensors
        bounds, counts = ctx.bounds, ctx.counts
        need_x, need_p, need_wg, need_wu, need_wd = ctx.needs_input_grad[:5]
        dout_TD = dout_TD.contiguous()
        dx_TD = x_ND.new_zeros(ctx.num_tokens, x_ND.shape[1]) if need_x else None
        dp_N = probs_N.new_empty(probs_N.shape) if need_p else None
        dw_gate = weight_grad_buffer(w_gate_EDF, bounds) if need_wg else None
        dw_up = weight_grad_buffer(w_up_EDF, bounds) if need_wu else None
        dw_down = weight_grad_buffer(w_down_EFD, bounds) if need_wd else None
        rows = max(counts, default=0)
        dout_buf = dout_TD.new_empty(rows, dout_TD.shape[1])
        dx_buf = x_ND.new_empty(rows, x_ND.shape[1]) if need_x else None

        toks, ps, gs, us, xs = (torch.split(t, counts) for t in (token_idx_N, probs_N, g_NF, u_NF, x_ND))
        dps = torch.split(dp_N, counts) if dp_N is not None else None
        wgT, wuT, wdT = (w.transpose(1, 2).unbind(0) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
        dwg, dwu, dwd = (None if w is None else w.unbind(0) for w in (dw_gate, dw_up, dw_down))
        for e, _, _ in bounds:
            n, tok_n, p_n1, g_nF, u_nF = counts[e], toks[e], ps[e][:, None], gs[e], us[e]
            dout_nD = torch.index_select(dout_TD, 0, tok_n, out=dout_buf[:n])
            a_nF = F.silu(g_nF)  # recomputed in cache, as in swiglu_experts.py
            h_nF = a_nF * u_nF
            dh_nF = torch.mm(dout_nD, wdT[e])  # unweighted: p is applied below
            if dps is not None:
                torch.sum(dh_nF * h_nF, dim=1, out=dps[e])
            if dwd is not None:
                torch.mm(h_nF.mul_(p_n1).t(), dout_nD, out=dwd[e])
            dh_nF.mul_(p_n1)
            du_nF = dh_nF * a_nF
            dg_nF = torch.ops.aten.silu_backward.grad_input(dh_nF.mul_(u_nF), g_nF, grad_input=dh_nF)
            x_nD = xs[e]
            if dx_TD is not None and dx_buf is not None:
                dx_nD = torch.mm(dg_nF, wgT[e], out=dx_buf[:n]).addmm_(du_nF, wuT[e])
                dx_TD.scatter_add_(0, tok_n[:, None].expand_as(dx_nD), dx_nD)
            if dwg is not None:
                torch.mm(x_nD.t(), dg_nF, out=dwg[e])
            if dwu is not None:
                torch.mm(x_nD.t(), du_nF, out=dwu[e])

        dp_TK = None
        if dp_N is not None:  # back to the flattened token order: order_N is a permutation (dropless)
            dp_TK = torch.empty_like(dp_N)
            dp_TK[order_N] = dp_N
            dp_TK = dp_TK.view(ctx.probs_shape)
        return dx_TD, dp_TK, dw_gate, dw_up, dw_down, None, None, None


def local_swiglu_moe(
    x_TD: torch.Tensor,
    probs_TK: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    w_down_EFD: torch.Tensor,
    order_N: torch.Tensor,
    token_idx_N: torch.Tensor,
    tokens_per_expert_E: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """out_TD[t] = sum_k probs_TK[t, k] * SwiGLU_{e(t,k)}(x_TD[t]), dropless, every expert local.

    order_N: the flattened (t, k) assignment of each copy sorted by expert (a permutation of range(T*K));
    token_idx_N = order_N // K; tokens_per_expert_E: copies per expert (what layers/permute.py computes).
    Computes in the autocast dtype when autocast is on (as `@` would), otherwise in x's dtype."""
    counts = host_counts(tokens_per_expert_E)
    N = probs_TK.numel()
    if sum(counts) != N or len(counts) != w_gate_EDF.shape[0] or order_N.numel() != N or token_idx_N.numel() != N:
        raise ValueError(
            f"counts {counts} must have one entry per expert ({w_gate_EDF.shape[0]}) and, like order_N "
            f"({order_N.numel()}) and token_idx_N ({token_idx_N.numel()}), cover all {N} token copies (dropless)."
        )
    dtype = compute_dtype(x_TD)
    tensors = [t if t.dtype == dtype else t.to(dtype) for t in (x_TD, probs_TK, w_gate_EDF, w_up_EDF, w_down_EFD)]
    with torch.autocast(x_TD.device.type, enabled=False):
        out_TD = _LocalSwiGLUMoE.apply(*tensors, order_N, token_idx_N, counts)
    return out_TD  # type: ignore[no-any-return]
