"""Losses against hand-computed values and against transformers' load_balancing_loss_func."""

from __future__ import annotations

import math

import pytest
import torch

from moe_plugin.layers.expert_bias import expert_bias_delta, update_expert_bias
from moe_plugin.layers.losses import (
    load_balancing_loss,
    router_entropy,
    router_z_loss,
    sequence_load_balancing_loss,
    tokens_per_expert,
)


def test_balance_loss_hand_computed():
    # T=2 tokens, E=2 experts, K=1. Token 0 -> expert 0, token 1 -> expert 0.
    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    ids = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.625, 0.375] -> E * sum f P = 2 * 0.625
    counts = tokens_per_expert(ids, 2)
    assert counts.tolist() == [2, 0]
    torch.testing.assert_close(load_balancing_loss(scores, counts), torch.tensor(1.25))


def test_balance_loss_is_one_when_uniform_and_e_when_collapsed():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    torch.testing.assert_close(load_balancing_loss(uniform, torch.tensor([4, 4, 4, 4])), torch.tensor(1.0))
    collapsed = torch.zeros(8, E)
    collapsed[:, 2] = 1.0
    torch.testing.assert_close(load_balancing_loss(collapsed, torch.tensor([0, 0, 8, 0])), torch.tensor(4.0))


def test_balance_loss_matches_megatron_form():
    torch.manual_seed(0)
    T, E, K = 30, 6, 2
    scores = torch.softmax(torch.randn(T, E), -1)
    ids = scores.topk(K, -1).indices
    c = tokens_per_expert(ids, E).float()
    megatron = E / (K * T**2) * (scores.sum(0) * c).sum()
    torch.testing.assert_close(load_balancing_loss(scores, c), megatron)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_balance_loss_matches_transformers_up_to_factor_k(K):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(K)
    E = 8
    logits = [torch.randn(12, E), torch.randn(12, E)]  # two layers' logits, as transformers concatenates them
    hf = load_balancing_loss_func(tuple(logits), num_experts=E, top_k=K)
    all_logits = torch.cat(logits)
    scores = torch.softmax(all_logits, -1)
    ids = scores.topk(K, -1).indices
    ours = load_balancing_loss(scores, tokens_per_expert(ids, E))
    # transformers' f sums to K (fraction of tokens per top-k slot, summed over slots); ours sums to 1.
    torch.testing.assert_close(hf, K * ours, atol=1e-6, rtol=1e-5)


def test_balance_loss_gradient_only_through_scores():
    scores = torch.softmax(torch.randn(5, 3, requires_grad=True), -1)
    counts = torch.tensor([5.0, 3.0, 2.0], requires_grad=True)
    load_balancing_loss(scores, counts).backward()
    assert counts.grad is None


def test_global_counts_make_loss_layout_independent():
    # Two "ranks" with 6 tokens each, sharing global counts, average to the single-process value.
    torch.manual_seed(0)
    scores = torch.softmax(torch.randn(12, 4), -1)
    ids = scores.topk(2, -1).indices
    global_counts = tokens_per_expert(ids, 4)
    single = load_balancing_loss(scores, global_counts)
    per_rank = [load_balancing_loss(scores[i * 6 : (i + 1) * 6], global_counts) for i in range(2)]
    torch.testing.assert_close(sum(per_rank) / 2, single)


def test_sequence_loss_hand_computed_and_equal_to_micro_batch_for_one_sequence():
    scores = torch.tensor([[[0.75, 0.25], [0.5, 0.5]], [[0.1, 0.9], [0.3, 0.7]]])
    ids = torch.tensor([[[0], [0]], [[1], [0]]])
    # seq 0: f=[1,0], P=[.625,.375] -> 1.25 ; seq 1: f=[.5,.5], P=[.2,.8] -> 2*(.1+.4)=1.0 ; mean 1.125
    torch.testing.assert_close(sequence_load_balancing_loss(scores, ids), torch.tensor(1.125))
    one = sequence_load_balancing_loss(scores[:1], ids[:1])
    torch.testing.assert_close(one, load_balancing_loss(scores[0], tokens_per_expert(ids[0], 2)))


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = torch.tensor([math.log(2.0), math.log(math.e + math.e**2)])
    torch.testing.assert_close(router_z_loss(logits), lse.pow(2).mean())


def test_entropy():
    torch.testing.assert_close(router_entropy(torch.full((3, 8), 0.125)), torch.tensor(math.log(8)))
    one_hot = torch.zeros(3, 8)
    one_hot[:, 1] = 1.0
    torch.testing.assert_close(router_entropy(one_hot), torch.tensor(0.0))


def test_expert_bias_sign_rule():
    counts = torch.tensor([10, 2, 6, 6])  # mean 6
    delta = expert_bias_delta(counts, rate=0.1)
    # raw: [-0.1, +0.1, 0, 0], mean 0 -> unchanged
    torch.testing.assert_close(delta, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([9, 1, 1, 1]), rate=0.1)  # raw [-.1,.1,.1,.1], mean .05
    torch.testing.assert_close(bias, torch.tensor([-0.15, 0.05, 0.05, 0.05]))
    assert abs(float(bias.sum())) < 1e-7
