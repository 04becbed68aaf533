"""FSDP2's all-gather and reduce-scatter expressed as all_reduce, for backends where that is faster (gloo).

Vocabulary: n ranks in the FSDP group, r this rank, N elements of the unsharded flat buffer, x_i rank i's
shard (N / n elements), g_i rank i's unsharded gradient buffer.

    all-gather      out = [x_0, ..., x_{n-1}]   ==  all_reduce_sum(out with only chunk r = x_r, zeros elsewhere)
    reduce-scatter  out_r = chunk_r(sum_i g_i)  ==  chunk_r(all_reduce_sum(g))

Both identities are exact for floating point: every sum in the all-gather adds zeros to one value, and the
reduce-scatter sums the same n values (in the order the backend's all_reduce uses). A ring all_reduce
moves 2(n-1)/n N elements against (n-1)/n N for a ring all-gather or reduce-scatter, so on NCCL these
would be slower; gloo's all_reduce, however, is its optimised collective and its all-gather and
reduce-scatter are not. Measured here (2-core CPU, torch 2.13, gloo, 32 MB fp32, ms per call):

    ranks   all_reduce   all_gather_into_tensor   reduce_scatter_tensor
      2         67               134                     163
      4         97               251                     355

(docs/performance.md, "Where the sharded step's time goes"). sharding.py installs these on every FSDP
module when the group's backend is gloo (`comms="auto"`), through FSDP2's own extension points
(FSDPModule.set_custom_all_gather / set_custom_reduce_scatter): no sharding logic is re-implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

# FSDP2's communication interfaces (torch 2.13 does not re-export them from torch.distributed.fsdp)
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

COMMS = ("auto", "native", "all_reduce")


class _Alloc:
    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


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
        mine = flat.narrow(0, r * k, k)
        if mine.data_ptr() != input_tensor.data_ptr():  # FSDP copies its input in place already: usually a no-op
            mine.copy_(input_tensor.view(-1))
        flat.narrow(0, 0, r * k).zero_()
        flat.narrow(0, (r + 1) * k, (n - r - 1) * k).zero_()
        return dist.all_reduce(output_tensor, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


class AllReduceReduceScatter(_Alloc, ReduceScatter):
    """Reduce-scatter of `input_tensor` (a buffer FSDP frees afterwards, reduced in place) by all_reduce."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: object,
        async_op: bool = False,
    ) -> dist.Work | None:
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):  # PREMUL_SUM and friends: the backend's own path
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        n, r = group.size(), group.rank()
        dist.all_reduce(input_tensor, op=dist.ReduceOp.SUM, group=group)
        chunk = input_tensor.view(-1).narrow(0, r * output_tensor.numel(), output_tensor.numel())
        if op == dist.ReduceOp.AVG:
            torch.div(chunk, n, out=output_tensor.view(-1))
        else:
            output_tensor.view(-1).copy_(chunk)
        return None


def check_comms(comms: str) -> str:
    """`comms` if it is one of COMMS, else a ValueError naming strategy.fsdp_comms."""
    if comms not in COMMS:
        raise ValueError(f"strategy.fsdp_comms={comms!r} is not one of {COMMS}.")
    return comms


def use_all_reduce(comms: str, group: dist.ProcessGroup | None) -> bool:
    """Whether `comms` ("auto": when the group's backend is gloo) selects the all_reduce-based collectives."""
    if check_comms(comms) == "auto":
        return group is not None and dist.get_backend(group) == "gloo"
    return comms == "all_reduce"
