"""LocalDispatcher behind the TokenDispatcher interface, and the interface's checks."""

from __future__ import annotations

import pytest
import torch

from moe_plugin.dispatch import AllReduceSum, LocalDispatcher, TokenDispatcher
from moe_plugin.layers.experts import GroupedExperts
from moe_plugin.layers.moe import MoE


def test_local_dispatch_is_identity_and_moe_output_unchanged():
    torch.manual_seed(0)
    m = MoE(16, num_experts=4, top_k=2, expert_hidden_size=8)
    assert type(m.dispatcher) is LocalDispatcher and m.dispatcher.num_experts == 4  # the default, never None
    x = torch.randn(10, 16, requires_grad=True)
    y_plain = m(x)
    g_plain = torch.autograd.grad(y_plain.sum(), x)[0]
    m.dispatcher = LocalDispatcher(4)
    y = m(x)
    assert torch.equal(y, y_plain)
    assert torch.equal(torch.autograd.grad(y.sum(), x)[0], g_plain)
    d = LocalDispatcher(4)
    x_ND, counts = torch.randn(6, 3), torch.tensor([1, 2, 0, 3])
    out, out_counts = d.dispatch(x_ND, counts)
    assert out is x_ND and out_counts is counts and d.combine(out) is out
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        d.dispatch(x_ND, torch.tensor([6]))


def test_base_class_validates_layout():
    class Half(TokenDispatcher):
        def dispatch(self, x_ND, tokens_per_expert_E):
            return x_ND, tokens_per_expert_E

        def combine(self, y_MD):
            return y_MD

    with pytest.raises(ValueError, match="divisible by the expert-parallel size"):
        Half(num_experts=6, num_local_experts=4)
    with pytest.raises(ValueError, match="local_expert_offset=6"):
        Half(num_experts=8, num_local_experts=4, local_expert_offset=6)
    assert "num_local_experts=4" in repr(Half(8, 4, 4))
    with pytest.raises(TypeError):
        TokenDispatcher(8, 8)  # abstract


def test_moe_rejects_dispatcher_that_does_not_match_its_experts():
    class Rank1(TokenDispatcher):
        """Serves global experts 4..7 (second of two EP ranks); the test only checks the layout check."""

        def dispatch(self, x_ND, tokens_per_expert_E):
            raise AssertionError("not reached")

        def combine(self, y_MD):
            raise AssertionError("not reached")

    m = MoE(16, num_experts=8, top_k=2, expert_hidden_size=8)
    m.experts = GroupedExperts(4, 16, 8, expert_offset=0)
    m.dispatcher = Rank1(8, 4, local_expert_offset=4)
    with pytest.raises(RuntimeError, match=r"dispatcher serves local experts \[4, 8\).*holds \[0, 4\)"):
        m(torch.randn(3, 16))


def test_all_reduce_sum_without_process_group_is_identity():
    c = torch.tensor([1, 2, 3])
    assert torch.equal(AllReduceSum()(c), c)
