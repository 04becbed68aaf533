"""Consensus helpers on 2 gloo processes (torch.multiprocessing spawn)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_plugin.parallel.consensus import all_ranks_agree, gather_floats, mean_over_ranks, min_over_ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {
            "agree_one": all_ranks_agree(rank == 1),
            "agree_none": all_ranks_agree(False),
            "mean": mean_over_ranks([float(rank), 2.0, float("nan") if rank == 0 else 1.0]),
            "gather": gather_floats([rank, 10.0 * rank]),
            "min": min_over_ranks([5 + rank, -(5 + rank)]),
        }
        out[rank] = res
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_every_rank_gets_the_same_answer():
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
        results = dict(out)
    for r in (0, 1):
        res = results[r]
        assert res["agree_one"] is True and res["agree_none"] is False
        assert res["mean"][:2] == [0.5, 2.0] and res["mean"][2] != res["mean"][2]  # NaN anywhere -> NaN everywhere
        assert res["gather"] == [[0.0, 0.0], [1.0, 10.0]]
        assert res["min"] == [5, -6]  # shortest 5, longest 6 (the expert_parallel loader-length check)


def test_single_process_is_local():
    assert all_ranks_agree(True) and not all_ranks_agree(False)
    assert mean_over_ranks([1, 2]) == [1.0, 2.0]
    assert gather_floats([3.0]) == [[3.0]]
    assert min_over_ranks([4, -4]) == [4, -4]
    assert torch.distributed.is_available()
