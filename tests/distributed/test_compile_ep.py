"""Regional compilation with the all-to-all dispatcher: a compiled expert-parallel model (2 gloo processes)
trains to the same losses as the eager one. The routed path runs eagerly (graph break), so the
collectives are the eager ones; aot_eager keeps the test quick (dynamo + AOT autograd, no C++ build)."""

from __future__ import annotations

import copy

import pytest
import torch
from dist_utils import run_distributed
from torch import nn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


def _check(rank: int, world: int) -> None:
    from moe_plugin.layers.moe import collect_aux_losses
    from moe_plugin.models.decoder import MoEDecoderLM
    from moe_plugin.parallel.apply import apply_expert_parallel
    from moe_plugin.parallel.compile import compile_blocks
    from moe_plugin.parallel.mesh import build_expert_parallel_mesh

    torch.manual_seed(0)
    base = MoEDecoderLM(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32,
        moe={"num_experts": 4, "top_k": 2, "expert_hidden_size": 32},
    )  # fmt: skip
    mesh = build_expert_parallel_mesh(2)
    losses = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        apply_expert_parallel(model, mesh)
        if compiled:
            compile_blocks(model, backend="aot_eager")
        gen = torch.Generator().manual_seed(10 + rank)  # each rank its own data
        batch = torch.randint(0, 64, (2, 17), generator=gen)
        run = []
        for _ in range(2):
            logits = model(batch[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1))
            loss = loss + collect_aux_losses(model)
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.05 * p.grad
                        p.grad = None
            run.append(float(loss.detach()))
        losses.append(run)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


def test_compiled_expert_parallel_matches_eager_2_procs() -> None:
    run_distributed(_check, 2, timeout=200)
