"""Dropless token-row movement: the permute gather and the weighted combine, each one autograd node.

Shapes: T tokens, K experts per token, D hidden, N = T*K token copies sorted by expert. order_N[n] is the
flat (t*K + k) assignment of sorted copy n, token_idx_N[n] = order_N[n] // K its token, and positions_TK
the inverse permutation (positions_TK.flat[order_N[n]] = n): where each (t, k) copy sits in sorted order.

    gather:   x_ND[n]   = x_TD[token_idx_N[n]]
              dx_TD[t]  = sum_k dx_ND[positions_TK[t, k]]                   (every token has K copies)
    combine:  out_TD[t] = sum_k p_TK[t, k] * y_ND[positions_TK[t, k]]
              dy_ND[n]  = p_N[n] * dout_TD[token_idx_N[n]],   dp_TK.flat[order_N[n]] = <dout_TD[token(n)], y_ND[n]>

Both backward passes only gather (no scatter-add, no zero fill), which the dropless permutation allows:
the permute backward is one embedding_bag over each token's K copies instead of index_add (measured at 4,096
tokens, 64 experts top-6, D 256: 3.9 vs 5.9 ms at 1 thread, 2.4 vs 3.5 ms at 2). Compiled C++ loops for
these rows were tried and measured slower than torch's own parallel index_select and embedding_bag (5.1 vs 4.4
and 6.4 vs 3.9 ms at 1 thread): every op here streams N x D rows through memory, which no loop avoids; only
fusing them into the expert GEMMs would (kernels/local_moe.py measured that, not faster on CPU either).
Reference: layers/permute.py unpermute_reference and plain index_select (tests/unit/kernels/test_token_rows.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Rows per block of the torch combine backward: the gathered output-gradient block (rows x D) stays in cache
# while it is both scaled into dy and dotted with y.
_COMBINE_BLOCK_ROWS = 2048


class _DroplessGather(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x_TD: torch.Tensor, token_idx_N: torch.Tensor, positions_TK: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(positions_TK)
        return x_TD.index_select(0, token_idx_N)

    @staticmethod
    def backward(ctx: Any, dx_ND: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (positions_TK,) = ctx.saved_tensors
        return F.embedding_bag(positions_TK, dx_ND.contiguous(), mode="sum"), None, None


def dropless_gather(x_TD: torch.Tensor, token_idx_N: torch.Tensor, positions_TK: torch.Tensor) -> torch.Tensor:
    """x_ND = x_TD[token_idx_N], with a gather-only backward (see the module docstring)."""
    return _DroplessGather.apply(x_TD, token_idx_N, positions_TK)  # type: ignore[no-any-return]


class _DroplessCombine(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, y_ND: torch.Tensor, probs_TK: torch.Tensor, order_N: torch.Tensor, positions_TK: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(y_ND, probs_TK, order_N)
        # One fused gather-weight-sum; each token's K copies form a bag. No N x D temporary for y * w.
        return F.embedding_bag(positions_TK, y_ND, per_sample_weights=probs_TK, mode="sum")

    @staticmethod
    def backward(ctx: Any, dout_TD: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:  # type: ignore[override]
        y_ND, probs_TK, order_N = ctx.saved_tensors
        need_y, need_p = ctx.needs_input_grad[:2]
        dout_TD = dout_TD.contiguous()
        return (*_combine_backward(dout_TD, y_ND, probs_TK, order_N, need_y, need_p), None, None)


def _combine_backward(
    dout_TD: torch.Tensor, y_ND: torch.Tensor, probs_TK: torch.Tensor, order_N: torch.Tensor, need_y: bool, need_p: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    N, D = y_ND.shape
    K = probs_TK.shape[1]
    token_idx_N = order_N // K
    probs_N = probs_TK.flatten()[order_N]
    dy_ND = y_ND.new_empty(N, D) if need_y else None
    dp_N = probs_N.new_empty(N) if need_p else None
    for s in range(0, N, _COMBINE_BLOCK_ROWS):
        t = min(s + _COMBINE_BLOCK_ROWS, N)
        idx_n = token_idx_N[s:t]
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
        dp_TK[order_N] = dp_N
        dp_TK = dp_TK.view_as(probs_TK)
    return dy_ND, dp_TK


def dropless_combine(
    y_ND: torch.Tensor, probs_TK: torch.Tensor, order_N: torch.Tensor, positions_TK: torch.Tensor
) -> torch.Tensor:
    """out_TD[t] = sum_k probs_TK[t, k] * y_ND[positions_TK[t, k]] (probs cast to y's dtype)."""
    return _DroplessCombine.apply(y_ND, probs_TK.to(y_ND.dtype), order_N, positions_TK)  # type: ignore[no-any-return]
