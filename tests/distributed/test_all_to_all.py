"""AllToAllDispatcher == LocalDispatcher (every expert local), outputs and gradients.

Skewed routing: expert 0 is in every token's top-k, the last expert never receives a token, and in one
case a rank holds only cold experts (receives nothing) or has no tokens at all; nobody may hang.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from moe_plugin.layers.dispatcher import LocalDispatcher
from moe_plugin.layers.moe import MoE
from moe_plugin.parallel.apply import apply_expert_parallel
from moe_plugin.parallel.mesh import build_expert_parallel_mesh

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

E, D, F, K = 8, 16, 24, 2


def _skewed_layer(cold: list[int]) -> MoE:
    torch.manual_seed(0)
    layer = MoE(D, num_experts=E, top_k=K, expert_hidden_size=F, aux_loss_coef=0.0, z_loss_coef=0.0)
    with torch.no_grad():
        layer.router.weight[0] += 0.3  # hot: inputs are positive, so expert 0 wins every token
        for e in cold:
            layer.router.weight[e] -= 5.0  # cold: never in a top-k
    return layer


def _check(rank: int, world: int, ep: int, tokens: list[int], cold: list[int]) -> None:
    ref = _skewed_layer(cold)
    model = copy.deepcopy(ref)
    ref.dispatcher = LocalDispatcher(E)
    torch.manual_seed(1)
    x_all = torch.rand(world, max(tokens), D) + 0.1
    g_all = torch.randn(world, max(tokens), D)
    T = tokens[rank]
    x_ref = x_all[rank, :T].clone().requires_grad_(True)
    y_ref = ref(x_ref)
    (y_ref * g_all[rank, :T]).sum().backward()

    mesh = build_expert_parallel_mesh(ep)
    plan = apply_expert_parallel(model, mesh, reduce_router_counts=False)
    experts_forward = model.experts.forward

    def skip_empty(x_MD: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # like a kernel that skips empty work: the result is not connected to the (empty) input
        return x_MD.new_zeros(0, D) if x_MD.shape[0] == 0 else experts_forward(x_MD, counts)

    model.experts.forward = skip_empty
    x = x_all[rank, :T].clone().requires_grad_(True)
    y = model(x)
    (y * g_all[rank, :T]).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.router.weight.grad, ref.router.weight.grad, rtol=1e-5, atol=1e-6)
    start, stop = mesh.local_expert_range(E)
    for name, p in model.experts.named_parameters():
        # the owner's gradient is the sum of what every rank of its expert group sent it
        ref_p = getattr(ref.experts, name)
        expected = ref_p.grad.clone() if ref_p.grad is not None else torch.zeros_like(ref_p)
        dist.all_reduce(expected, group=mesh.expert_group)
        grad = p.grad if p.grad is not None else torch.zeros_like(p)  # unused experts: None (counted as zeros)
        torch.testing.assert_close(grad, expected[start:stop], rtol=1e-5, atol=1e-6)
    assert set(plan.expert_params) == {"experts.w_gate_EDF", "experts.w_up_EDF", "experts.w_down_EFD"}
    # a second forward/backward on the same dispatcher (state is per call)
    model(x.detach()).sum().backward()


def _check_equal_batch_counts(rank: int, world: int) -> None:
    """Uneven evaluation loaders are cut to the shortest rank's length (else the all-to-all would hang)."""
    from torch.utils.data import DataLoader

    from moe_plugin.lightning.strategies.expert_parallel import ExpertParallelStrategy

    strategy = ExpertParallelStrategy()
    uneven = DataLoader(list(range(10 + rank)), batch_size=2)  # 5 batches on rank 0, 6 on rank 1, ...
    cut = strategy.process_dataloader(uneven)
    assert len(cut) == 5 and len(list(cut)) == 5 and cut.batch_size == 2
    even = DataLoader(list(range(10)), batch_size=2)
    assert strategy.process_dataloader(even) is even


def _check_cases(rank: int, world: int, cases: list[tuple[int, list[int], list[int]]]) -> None:
    # one launch runs several layouts: process start-up (imports) dominates the cost on 2 cores
    for ep, tokens, cold in cases:
        _check(rank, world, ep, tokens, cold)
    _check_equal_batch_counts(rank, world)


def test_all_to_all_matches_local_2_procs() -> None:
    cases = [
        (2, [37, 23], [7]),  # uneven tokens, expert 7 never routed
        (2, [16, 16], [4, 5, 6, 7]),  # rank 1's experts all cold: it receives nothing
        (2, [20, 0], [7]),  # rank 1 has no tokens at all
        (1, [9, 13], [3]),  # EP=1: the dispatcher is the identity
    ]
    run_distributed(_check_cases, 2, cases, timeout=180)


@pytest.mark.slow
def test_all_to_all_matches_local_4_procs() -> None:
    run_distributed(_check_cases, 4, [(4, [31, 7, 0, 19], [6, 7]), (2, [11, 5, 17, 3], [7])], timeout=200)
