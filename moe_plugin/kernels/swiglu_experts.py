"""Fused SwiGLU experts: the whole routed-expert MLP as ONE autograd node with a hand-written backward.

Shapes: N token copies sorted by expert, E experts (local), D hidden, F expert FFN hidden;
rows offs[e-1]:offs[e] (offs = cumsum of the host counts) belong to expert e.

    forward:   g_NF = x @ Wg[e],  u_NF = x @ Wu[e]           (per expert, into preallocated outputs)
               h_NF = silu(g) * u
               y_ND = h @ Wd[e]
    backward:  dh   = dy @ Wd[e]^T,             dWd[e] = h_e^T dy_e
               du   = dh * silu(g),             dg     = dh * u * silu'(g),  silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
               dx   = dg @ Wg[e]^T + du @ Wu[e]^T,   dWg[e] = x_e^T dg_e,   dWu[e] = x_e^T du_e

Why (measured on a 2-core AVX-512 CPU, torch 2.13, docs/performance.md): on CPU `torch._grouped_mm` is a
loop in C++ whose backward runs its GEMMs ~15-25% slower than plain `torch.mm` on the same slices, and
fusing gate and up into one GEMM needs a weight-sized `cat` every forward and backward. Here every GEMM
is one `torch.mm(..., out=slice)` per expert in the layout MKL/oneDNN likes (no copies, no cat). Each
expert's whole MLP (forward) and whole backward run before the next expert's, so its elementwise SwiGLU
work reads operands still in cache; only g and u are saved (silu(g) and h are recomputed per expert in
backward, in cache: half the saved activations of autograd on the composed ops). The expert counts must be on the host (one `.tolist()` per
layer, done by the caller); GPUs should keep using the one-kernel `torch._grouped_mm` path instead.

Two implementations of the same node: `native=True` runs forward and backward as two compiled CPU ops
(kernels/csrc/swiglu_experts.cpp, built by kernels/native.py) that cut the N rows into one contiguous range
per intra-op thread, so that every thread runs whole per-expert GEMMs single-threaded (a few-hundred-row GEMM
does not scale over threads inside MKL) and no Python runs per expert; `native=False` is the Python loop
below, one `torch.mm` per expert, each threaded by MKL. Same math, same saved tensors.

Reference: `experts_loop` in moe_plugin/layers/experts.py (tests/unit/kernels/test_swiglu_experts.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from moe_plugin.kernels.grouped_mm import compute_dtype, expert_bounds, host_counts, weight_grad_buffer
from moe_plugin.kernels.native import native_ops

# Rows per block of the compiled kernel: each thread walks its experts in blocks of at most this many rows
# (bounds its g/u/h workspace for a hot expert; below it an expert's GEMMs run whole).
NATIVE_BLOCK_ROWS = 1024
# Fewer rows than this per thread and the compiled kernel uses fewer threads.
NATIVE_MIN_ROWS_PER_THREAD = 64


class _SwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_ND: torch.Tensor,
        w_gate_EDF: torch.Tensor,
        w_up_EDF: torch.Tensor,
        w_down_EFD: torch.Tensor,
        counts: Sequence[int],
        native: bool,
    ) -> torch.Tensor:
        x_ND = x_ND.contiguous()
        ctx.native = native
        if native:
            y_ND, g_NF, u_NF = native_ops().swiglu_experts_forward(  # type: ignore[attr-defined]
                x_ND, w_gate_EDF, w_up_EDF, w_down_EFD, list(counts), NATIVE_BLOCK_ROWS, NATIVE_MIN_ROWS_PER_THREAD
            )
            ctx.counts = list(counts)
            ctx.save_for_backward(x_ND, w_gate_EDF, w_up_EDF, w_down_EFD, g_NF, u_NF)
            return y_ND  # type: ignore[no-any-return]
        N, F_ = x_ND.shape[0], w_gate_EDF.shape[-1]
        bounds = expert_bounds(counts)
        g_NF = x_ND.new_empty(N, F_)
        u_NF = x_ND.new_empty(N, F_)
        y_ND = x_ND.new_empty(N, w_down_EFD.shape[-1])

        # The whole MLP of one expert before the next: its g, u and h are still in cache for the elementwise
        # work and the down projection. h is a per-expert temporary (recomputed in backward). The per-expert
        # views come from one split/unbind call each (64 experts: ~10 Python-level view ops fewer per expert).
        xs, gs, us, ys = (torch.split(t, counts) for t in (x_ND, g_NF, u_NF, y_ND))
        wg, wu, wd = w_gate_EDF.unbind(0), w_up_EDF.unbind(0), w_down_EFD.unbind(0)
        for e, _, _ in bounds:
            g_nF = torch.mm(xs[e], wg[e], out=gs[e])
            u_nF = torch.mm(xs[e], wu[e], out=us[e])
            torch.mm(F.silu(g_nF).mul_(u_nF), wd[e], out=ys[e])
        ctx.bounds, ctx.counts = bounds, list(counts)
        ctx.save_for_backward(x_ND, w_gate_EDF, w_up_EDF, w_down_EFD, g_NF, u_NF)
        return y_ND

    @staticmethod
    def backward(ctx: Any, dy_ND: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_ND, w_gate_EDF, w_up_EDF, w_down_EFD, g_NF, u_NF = ctx.saved_tensors
        dy_ND = dy_ND.contiguous()
        need_x, need_wg, need_wu, need_wd = ctx.needs_input_grad[:4]
        if ctx.native:
            need_w = need_wg or need_wu or need_wd
            dx, dwg, dwu, dwd = native_ops().swiglu_experts_backward(  # type: ignore[attr-defined]
                dy_ND,
                x_ND,
                w_gate_EDF,
                w_up_EDF,
                w_down_EFD,
                g_NF,
                u_NF,
                ctx.counts,
                need_x,
                need_w,
                NATIVE_BLOCK_ROWS,
                NATIVE_MIN_ROWS_PER_THREAD,
            )
            keep = (need_x, need_wg, need_wu, need_wd)
            return (*(t if k else None for t, k in zip((dx, dwg, dwu, dwd), keep)), None, None)
        bounds = ctx.bounds
        dx_ND = torch.empty_like(x_ND) if need_x else None
        dw_down = weight_grad_buffer(w_down_EFD, bounds) if need_wd else None
        dw_gate = weight_grad_buffer(w_gate_EDF, bounds) if need_wg else None
        dw_up = weight_grad_buffer(w_up_EDF, bounds) if need_wu else None

        # Views of every expert's rows and weights, made in a few C++ calls rather than per expert.
        counts = ctx.counts
        xs, gs, us, dys = (torch.split(t, counts) for t in (x_ND, g_NF, u_NF, dy_ND))
        wgT, wuT, wdT = (w.transpose(1, 2).unbind(0) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
        dxs = torch.split(dx_ND, counts) if dx_ND is not None else None
        dwd, dwg, dwu = (None if w is None else w.unbind(0) for w in (dw_down, dw_gate, dw_up))

        for e, _, _ in bounds:
            g_nF, u_nF, dy_nD, x_nD = gs[e], us[e], dys[e], xs[e]
            a_nF = F.silu(g_nF)  # recomputed in cache: cheaper than saving a and h for every row
            if dwd is not None:
                torch.mm(torch.mul(a_nF, u_nF).t(), dy_nD, out=dwd[e])
            dh_nF = torch.mm(dy_nD, wdT[e])
            # du = dh * silu(g); dg = silu'(g) * (dh * u), in dh's buffer (saved tensors stay intact, so
            # a retain_graph backward can run again)
            du_nF = dh_nF * a_nF
            dg_nF = torch.ops.aten.silu_backward.grad_input(dh_nF.mul_(u_nF), g_nF, grad_input=dh_nF)
            if dxs is not None:
                torch.mm(dg_nF, wgT[e], out=dxs[e]).addmm_(du_nF, wuT[e])
            if dwg is not None or dwu is not None:
                x_Dn = x_nD.t()
                if dwg is not None:
                    torch.mm(x_Dn, dg_nF, out=dwg[e])
                if dwu is not None:
                    torch.mm(x_Dn, du_nF, out=dwu[e])

        if dx_ND is not None and len(bounds) == 0:
            dx_ND.zero_()
        return dx_ND, dw_gate, dw_up, dw_down, None, None


def swiglu_experts(
    x_ND: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    w_down_EFD: torch.Tensor,
    tokens_per_expert_E: torch.Tensor | Sequence[int],
    native: bool = False,
) -> torch.Tensor:
    """y_ND[n] = (silu(x_n @ Wg[e]) * (x_n @ Wu[e])) @ Wd[e] for the expert e of row n.

    Computes in the autocast dtype when autocast is on (as `@` would), otherwise in x's dtype. `native=True`
    asks for the compiled CPU kernel (the caller checked `native_ops()`); it is taken for plain CPU tensors
    and the Python loop serves anything else (tensor subclasses, other devices)."""
    counts = host_counts(tokens_per_expert_E)
    if sum(counts) != x_ND.shape[0] or len(counts) != w_gate_EDF.shape[0]:
        raise ValueError(
            f"counts {list(counts)} must have one entry per expert ({w_gate_EDF.shape[0]}) and sum to the "
            f"{x_ND.shape[0]} rows of x."
        )
    dtype = compute_dtype(x_ND)
    tensors = [t if t.dtype == dtype else t.to(dtype) for t in (x_ND, w_gate_EDF, w_up_EDF, w_down_EFD)]
    native = native and native_applies(tensors)
    with torch.autocast(x_ND.device.type, enabled=False):
        return _SwiGLUExperts.apply(*tensors, counts, native)  # type: ignore[no-any-return]


def native_applies(tensors: Sequence[torch.Tensor]) -> bool:
    """The compiled kernel takes plain dense CPU tensors of one float dtype (no DTensor or other subclass)."""
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype in (torch.float32, torch.bfloat16, torch.float64)
        and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided for t in tensors)
        and native_ops() is not None
    )
