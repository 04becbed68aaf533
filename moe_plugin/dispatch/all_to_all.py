"""AllToAllDispatcher: dropless token exchange between the ranks of an expert group.

Shapes: E global experts, L = E / EP local experts, EP ranks in the expert group, D hidden,
N token copies produced on this rank (sorted by GLOBAL expert id), M copies received for the local experts.

Rank j of the expert group holds global experts [j*L, (j+1)*L). One forward:

    1. counts:   tokens_per_expert_E viewed as send_RL[r, l] = copies for expert r*L + l;
                 all_to_all of the counts gives recv_RL[r, l] = copies rank r sends to MY local expert l
    2. exchange: all_to_all_single(x_ND, input splits send_RL.sum(1), output splits recv_RL.sum(1))
                 -> copies ordered by (source rank, local expert)
    3. regroup:  permute to (local expert, source rank) so each local expert's copies are contiguous
                 -> x_MD, tokens_per_local_expert_L = recv_RL.sum(0)
    combine: the inverse permutation, then all_to_all back with the splits swapped.

Dropless: split sizes are exact counts, nothing is padded or dropped (unlike capacity-based exchanges,
DeepSpeed/GShard). The number and order of collectives per call is fixed (two all_to_alls in dispatch,
one in combine, one more of each in backward) whatever the routing, so a rank with zero tokens for some
or all experts still takes part and nobody hangs (DeepSpeed #1392, #2870). Autograd flows through the
exchange: the backward of an all_to_all is the all_to_all with input and output splits swapped.

The split sizes must be known on the host (`.tolist()`): one device->host sync per dispatch, as in
Megatron-Core's AllToAll dispatcher; the local experts' counts come back in the same copy (as a host
tensor), so the expert GEMMs need no second sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_plugin.layers.dispatcher import TokenDispatcher


class _AllToAllSingle(torch.autograd.Function):
    """all_to_all_single with variable splits along dim 0; backward exchanges gradients the other way."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_ND: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x_ND.new_empty((sum(output_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None


class _TieGraph(torch.autograd.Function):
    """Returns y unchanged; its backward also gives `anchor` a zero gradient.

    Why: an autograd Function's backward runs only if its output is used by something requiring grad. A
    rank whose local experts received no token may get an expert output that is not connected to the
    received tokens (an empty result created from scratch); then that rank would skip the backward
    all-to-alls that the other ranks enter, and the exchange pairs up wrongly or hangs. Tying the output
    to the received tokens keeps the backward collectives identical on every rank.
    """

    @staticmethod
    def forward(ctx: Any, y_MD: torch.Tensor, anchor_MD: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.anchor_meta = (anchor_MD.shape, anchor_MD.dtype, anchor_MD.device)
        return y_MD.view_as(y_MD)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        shape, dtype, device = ctx.anchor_meta
        return grad_y, torch.zeros(shape, dtype=dtype, device=device) if ctx.needs_input_grad[1] else None


def all_to_all_single_autograd(
    x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Differentiable variable-split all_to_all along dim 0."""
    return _AllToAllSingle.apply(x_ND, output_splits, input_splits, group)  # type: ignore[no-any-return]


@dataclass
class _Exchange:
    """What combine needs to undo the last dispatch."""

    input_splits: list[int]
    output_splits: list[int]
    regroup_M: torch.Tensor | None  # x_MD = x_received[regroup_M]; None when it is the identity
    x_MD: torch.Tensor | None = None  # what dispatch returned (ties the two exchanges into one graph)


def regroup_index(recv_RL: torch.Tensor) -> torch.Tensor:
    """Index turning rows ordered (source rank r, local expert l) into rows ordered (l, r).

    recv_RL[r, l] rows arrived from rank r for local expert l, blocks laid out r-major. Returns idx_M
    with x_grouped = x_received[idx_M].
    """
    sizes_RL = recv_RL.to(torch.int64)
    starts_RL = (torch.cumsum(sizes_RL.flatten(), 0) - sizes_RL.flatten()).view_as(sizes_RL)
    sizes_S = sizes_RL.t().flatten()  # segments in (l, r) order
    starts_S = starts_RL.t().flatten()
    seg_M = torch.repeat_interleave(torch.arange(sizes_S.numel(), device=sizes_S.device), sizes_S)
    seg_begin_S = torch.cumsum(sizes_S, 0) - sizes_S
    pos_M = torch.arange(seg_M.numel(), device=sizes_S.device) - seg_begin_S[seg_M]
    return starts_S[seg_M] + pos_M


class AllToAllDispatcher(TokenDispatcher):
    """Expert-parallel token dispatcher over `group` (the expert group of the mesh, EP ranks).

    Implements moe_plugin.layers.dispatcher.TokenDispatcher: num_experts (global, E), num_local_experts (L),
    local_expert_offset (first global id held here).
    """

    def __init__(
        self,
        num_experts: int,
        num_local_experts: int,
        local_expert_offset: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        ep = dist.get_world_size(group) if dist.is_initialized() else 1
        if num_local_experts * ep != num_experts:
            raise ValueError(
                f"num_local_experts={num_local_experts} x expert group size {ep} must equal num_experts={num_experts} "
                "(num_experts must be divisible by strategy.expert_parallel_size)."
            )
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        if local_expert_offset != rank * num_local_experts:
            raise ValueError(
                f"local_expert_offset={local_expert_offset} does not match this rank's position {rank} in the expert "
                f"group (expected {rank * num_local_experts})."
            )
        super().__init__(num_experts, num_local_experts, local_expert_offset)
        self.group = group
        self.expert_parallel_size = ep
        self._last: _Exchange | None = None

    def dispatch(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert has shape {tuple(tokens_per_expert_E.shape)}, expected ({self.num_experts},)."
            )
        ep, L = self.expert_parallel_size, self.num_local_experts
        send_RL = tokens_per_expert_E.to(torch.int64).reshape(ep, L)
        if ep == 1:
            self._last = _Exchange([x_ND.shape[0]], [x_ND.shape[0]], None)
            return x_ND, send_RL[0]
        recv_RL = torch.empty_like(send_RL)
        dist.all_to_all_single(recv_RL, send_RL.contiguous(), group=self.group)
        # ONE host sync per layer: the exchange splits and the local experts' counts (which the experts'
        # per-expert GEMMs need on the host) in one copy; the counts are returned as a host tensor.
        host = torch.cat([send_RL.sum(1), recv_RL.sum(1), recv_RL.sum(0)]).tolist()
        input_splits, output_splits = host[:ep], host[ep : 2 * ep]
        tokens_per_local_expert_L = torch.tensor(host[2 * ep :], dtype=torch.int64)
        x_recv = all_to_all_single_autograd(x_ND, output_splits, input_splits, self.group)
        regroup = regroup_index(recv_RL) if L > 1 else None
        # index_select, not x_recv[regroup]: its backward is index_add, several times faster on CPU than the
        # index_put(accumulate=True) of advanced indexing
        x_MD = x_recv.index_select(0, regroup) if regroup is not None else x_recv
        self._last = _Exchange(input_splits, output_splits, regroup, x_MD)
        return x_MD, tokens_per_local_expert_L

    def combine(self, y_MD: torch.Tensor) -> torch.Tensor:
        if self._last is None:
            raise RuntimeError("AllToAllDispatcher.combine called before dispatch.")
        ex, self._last = self._last, None
        if self.expert_parallel_size == 1:
            return y_MD
        if torch.is_grad_enabled() and ex.x_MD is not None:
            if not y_MD.requires_grad and not ex.x_MD.requires_grad:
                y_MD = y_MD.detach().requires_grad_()  # the combine backward must run on every rank
            y_MD = _TieGraph.apply(y_MD, ex.x_MD)
        if ex.regroup_M is not None:
            # y_recv[regroup[m]] = y[m]: the inverse permutation, as a gather so autograd stays a gather
            inverse_M = torch.empty_like(ex.regroup_M)
            inverse_M[ex.regroup_M] = torch.arange(ex.regroup_M.numel(), device=ex.regroup_M.device)
            y_MD = y_MD.index_select(0, inverse_M)
        return all_to_all_single_autograd(y_MD, ex.input_splits, ex.output_splits, self.group)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, expert_parallel_size={self.expert_parallel_size})"
