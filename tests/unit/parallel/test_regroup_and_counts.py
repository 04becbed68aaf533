"""Pure pieces of expert parallelism, checked against slow obvious references in one process."""

from __future__ import annotations

import torch

from moe_plugin.dispatch.all_to_all import regroup_index
from moe_plugin.layers.moe import MoE


def test_regroup_index_matches_a_loop() -> None:
    torch.manual_seed(0)
    for _ in range(20):
        R, L = torch.randint(1, 5, (2,)).tolist()
        recv_RL = torch.randint(0, 4, (R, L))
        recv_RL[0, 0] = 0  # empty segments included
        # rows laid out (source r, local expert l), r-major; label each row with (l, r, position)
        rows = [(j, r, i) for r in range(R) for j in range(L) for i in range(int(recv_RL[r, j]))]
        expected = sorted(range(len(rows)), key=lambda n: (rows[n][0], rows[n][1], rows[n][2]))
        assert regroup_index(recv_RL).tolist() == expected


def test_global_counts_make_the_balance_loss_layout_independent() -> None:
    """mean over 2 "ranks" of the loss with summed counts == the loss of the whole batch (and its gradient)."""
    torch.manual_seed(0)
    layer = MoE(16, num_experts=8, top_k=2, expert_hidden_size=8)
    x = torch.randn(2, 10, 16)
    layer(x.reshape(20, 16))
    full_aux = layer.aux_loss
    full_grad = torch.autograd.grad(full_aux, layer.router.weight)[0]

    counts = [torch.bincount(layer.router(x[i]).topk_ids_TK.flatten(), minlength=8) for i in range(2)]
    layer.count_reduce = lambda c: counts[0] + counts[1]
    parts = []
    for i in range(2):
        layer(x[i])
        parts.append(layer.aux_loss)
    mean = (parts[0] + parts[1]) / 2
    torch.testing.assert_close(mean, full_aux, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(mean, layer.router.weight)[0], full_grad, rtol=1e-5, atol=1e-7)
    assert int(layer.stats.tokens_per_expert_E.sum()) == 20  # statistics stay per rank (ExpertLoad sums them)
