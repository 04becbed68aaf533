"""FSDP2's all-gather and reduce-scatter as point-to-point exchanges (or as all_reduce), for backends where
that is faster than their own collectives (gloo).

Vocabulary: n ranks in the FSDP group, r this rank, N elements of the unsharded flat buffer, x_i rank i's
shard (N / n elements), g_i rank i's unsharded gradient buffer, chunk_j(.) the j-th of n equal chunks.

    all-gather      out = [x_0, ..., x_{n-1}]:  send x_r to every peer, receive x_j into chunk j   ("p2p")
                                            ==  all_reduce_sum(out with only chunk r = x_r, zeros elsewhere)
    reduce-scatter  out_r = chunk_r(sum_i g_i): in round k = 1..n-1 send chunk_{r+k}(g_r) to rank r+k,
                    receive chunk_r(g_{r-k}) from rank r-k and add it                               ("p2p")
                                            ==  chunk_r(all_reduce_sum(g))

Every form is exact: the p2p all-gather only copies bytes (any dtype), the all_reduce one adds zeros to one
value; the p2p reduce-scatter sums the n values of an element in the order g_r, g_{r-1}, ..., (with n = 2 that
is any order: a + b == b + a), the all_reduce one in the backend's order. Each rank sends (n-1)/n N elements
in the p2p forms, the same as a ring all-gather or reduce-scatter and half of a ring all_reduce's 2(n-1)/n N.

gloo's own all_gather_into_tensor and reduce_scatter_tensor are slower than its all_reduce, its point-to-point
sends are not. Measured here (2-core CPU, torch 2.13, gloo over loopback, 4 processes in two groups of 2 as
EP 2 x shard 2 runs them, 24 MB fp32 per call, ms; /work/bin/quiet, load 1.9):

    all_reduce   all_gather_into_tensor   p2p all-gather   reduce_scatter_tensor   p2p reduce-scatter
       33                  39                   15                   55                    21

(docs/performance.md, "Expert parallelism x FSDP2 sharding"). sharding.py installs these on every FSDP module
when the group's backend is gloo (`comms="auto"` = "p2p"), through FSDP2's own extension points
(FSDPModule.set_custom_all_gather / set_custom_reduce_scatter): no sharding logic is re-implemented. The p2p
forms complete before they return (FSDP2 then has no Work to wait for): FSDP2's unshards are synchronous by
default, and on a CPU there is no side stream for them to overlap with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

# FSDP2's communication interfaces (torch 2.13 does not re-export them from torch.distributed.fsdp)
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

COMMS = ("auto", "native", "p2p", "all_reduce")


class _Alloc:
    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


def _place_own_shard(mine: torch.Tensor, input_tensor: torch.Tensor) -> None:
    """This rank's chunk of the gathered buffer <- its shard (FSDP copies it in place already: usually a no-op)."""
    if mine.data_ptr() != input_tensor.data_ptr():
        mine.copy_(input_tensor.view(-1))


class AllReduceAllGather(_Alloc, AllGather):
    """All-gather into `output_tensor` (n chunks) by a sum of zero-padded shards (see the module docstring)."""

    def __call__(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False
    ) -> dist.Work | None:
        if not output_tensor.is_floating_point():  # uint8 views of mixed-dtype shards: sums of bytes would wrap
            return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)
        n, r = group.size(), group.rank()
        k = input_tensor.numel()
        flat = output_tensor.view(-1)
        _place_own_shard(flat.narrow(0, r * k, k), input_tensor)
        flat.narrow(0, 0, r * k).zero_()
        flat.narrow(0, (r + 1) * k, (n - r - 1) * k).zero_()
        return dist.all_reduce(output_tensor, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


class _SumReduceScatter(_Alloc, ReduceScatter):
    """A reduce-scatter whose SUM and AVG are `_reduce_scatter` (complete on return); any other op (PREMUL_SUM
    and friends) takes the backend's own path."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: object,
        async_op: bool = False,
    ) -> dist.Work | None:
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        self._reduce_scatter(output_tensor.view(-1), input_tensor, group, op == dist.ReduceOp.AVG)
        return None

    def _reduce_scatter(
        self, out: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup, avg: bool
    ) -> None:
        """out (this rank's flat chunk) <- the sum over the group of input_tensor's chunk r, / n if `avg`."""
        raise NotImplementedError


class AllReduceReduceScatter(_SumReduceScatter):
    """Reduce-scatter of `input_tensor` (a buffer FSDP frees afterwards, reduced in place) by all_reduce."""

    def _reduce_scatter(
        self, out: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup, avg: bool
    ) -> None:
        n, r = group.size(), group.rank()
        dist.all_reduce(input_tensor, op=dist.ReduceOp.SUM, group=group)
        chunk = input_tensor.view(-1).narrow(0, r * out.numel(), out.numel())
        if avg:
            torch.div(chunk, n, out=out)
        else:
            out.copy_(chunk)


def _exchange(ops: list[dist.P2POp]) -> None:
    for work in dist.batch_isend_irecv(ops):
        work.wait()


class P2PAllGather(_Alloc, AllGather):
    """All-gather into `output_tensor` (n chunks) by sending this rank's shard to every peer (see the module
    docstring); a pure copy, so any dtype (FSDP's uint8 views of mixed-dtype shards included)."""

    def __call__(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False
    ) -> dist.Work | None:
        n, r = group.size(), group.rank()
        k = input_tensor.numel()
        chunks = output_tensor.view(-1).split(k)
        _place_own_shard(chunks[r], input_tensor)
        if n > 1:
            ops = []
            for j in range(n):
                if j != r:
                    ops.append(dist.P2POp(dist.isend, chunks[r], group=group, group_peer=j))
                    ops.append(dist.P2POp(dist.irecv, chunks[j], group=group, group_peer=j))
            _exchange(ops)
        return None  # complete (see the module docstring)


class P2PReduceScatter(_SumReduceScatter):
    """Reduce-scatter of `input_tensor` by n - 1 rounds of pairwise exchange (see the module docstring): one
    chunk of extra memory when n > 2, none when n = 2 (the peer's chunk is received into the output)."""

    def _reduce_scatter(
        self, out: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup, avg: bool
    ) -> None:
        n, r = group.size(), group.rank()
        chunks = input_tensor.view(-1).split(out.numel())
        received = out if n == 2 else torch.empty_like(out)
        for k in range(1, n):
            to, frm = (r + k) % n, (r - k) % n
            _exchange(
                [
                    dist.P2POp(dist.isend, chunks[to], group=group, group_peer=to),
                    dist.P2POp(dist.irecv, received, group=group, group_peer=frm),
                ]
            )
            if n == 2:
                out.add_(chunks[r])  # g_peer + g_r
            elif k == 1:
                torch.add(chunks[r], received, out=out)
            else:
                out.add_(received)
        if avg:
            out.div_(n)


def check_comms(comms: str) -> str:
    """`comms` if it is one of COMMS, else a ValueError naming strategy.fsdp_comms."""
    if comms not in COMMS:
        raise ValueError(f"strategy.fsdp_comms={comms!r} is not one of {COMMS}.")
    return comms


def custom_comms(comms: str, group: dist.ProcessGroup | None) -> tuple[AllGather, ReduceScatter] | None:
    """The (all-gather, reduce-scatter) pair `comms` selects, or None for the backend's own collectives.

    "auto": the p2p forms when the group's backend is gloo (measured faster there, see the module docstring),
    else the backend's own (NCCL's ring collectives move the fewest bytes)."""
    if check_comms(comms) == "auto":
        comms = "p2p" if group is not None and dist.get_backend(group) == "gloo" else "native"
    if comms == "p2p":
        return P2PAllGather(), P2PReduceScatter()
    if comms == "all_reduce":
        return AllReduceAllGather(), AllReduceReduceScatter()
    return None
