"""Global-batch balance loss over 2 gloo processes: with AllReduceSum as MoE.count_reduce, the ranks'
losses average to the single-process loss on the same global batch (the value does not depend on the
data-parallel layout), and the summed counts are identical on every rank."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_plugin.dispatch import AllReduceSum
from moe_plugin.layers.moe import MoE, moe_start_step


def _model() -> MoE:
    torch.manual_seed(0)
    m = MoE(16, num_experts=8, top_k=2, expert_hidden_size=8, balance_loss_type="global_batch")
    with torch.no_grad():
        m.router.weight.normal_(std=0.5)
    return m.train()


def _batch() -> torch.Tensor:
    return torch.randn(24, 16, generator=torch.Generator().manual_seed(1))


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = _model()
        m.count_reduce = AllReduceSum()
        moe_start_step(m, 0)
        x = _batch().chunk(world)[rank]
        m(x)
        counts = m.count_reduce(m.stats.step_tokens_per_expert_E)
        out[rank] = (float(m.stats.losses["balance_loss"]), counts.tolist())
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_global_batch_loss_is_layout_independent():
    m = _model()
    moe_start_step(m, 0)
    m(_batch())
    single = float(m.stats.losses["balance_loss"])
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        results = dict(out)
    (loss0, counts0), (loss1, counts1) = results[0], results[1]
    assert counts0 == counts1 == m.stats.tokens_per_expert_E.tolist()
    assert (loss0 + loss1) / 2 == pytest.approx(single, rel=1e-6)
    assert loss0 != pytest.approx(loss1)  # the ranks really saw different tokens
