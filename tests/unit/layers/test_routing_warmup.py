"""Stochastic Routing Warmup (Ling): random routing at step 0, the paper's blend in between, and the
learned logits exactly from step W on."""

from __future__ import annotations

import pytest
import torch

from moe_plugin.layers.moe import MoE, moe_start_step
from moe_plugin.layers.router import TopKRouter
from moe_plugin.layers.routing_warmup import StochasticRoutingWarmup, commit_routing_warmup, keyed_normal


def test_blend_formula_and_statistics():
    w = StochasticRoutingWarmup(num_experts=4, warmup_steps=10, momentum=0.5).train()
    logits = torch.randn(64, 4) * 3 + 1
    w.set_step(4)
    out = w(logits)
    eps = keyed_normal(0, 4, 0, torch.arange(64), 4)
    mu, sigma = logits.mean(), logits.std()  # step 0 of the statistics: the micro-batch's own moments
    torch.testing.assert_close(out, 0.4 * logits + 0.6 * (mu + sigma * eps))
    assert int(w.num_updates) == 0  # staged, not committed
    commit_routing_warmup(w)
    torch.testing.assert_close(w.logit_mean, mu)
    torch.testing.assert_close(w.logit_std, sigma)
    assert w.blend() == 0.5  # an accepted step advances i
    logits2 = torch.randn(32, 4)
    logits3 = torch.randn(32, 4) + 2
    w(logits2)
    w(logits3)  # two micro-batches of one optimizer step: their union's moments
    commit_routing_warmup(w)
    both = torch.cat([logits2, logits3])
    torch.testing.assert_close(w.logit_mean, 0.5 * mu + 0.5 * both.mean())
    torch.testing.assert_close(w.logit_std, 0.5 * sigma + 0.5 * both.std())


def test_step_zero_is_random_at_the_logits_scale_and_balanced():
    # A router collapsed onto expert 0: without warmup every token goes there; at step 0 load is spread.
    r = TopKRouter(8, 8, 2, routing_warmup_steps=50).train()
    with torch.no_grad():
        r.weight.zero_()
        r.weight[0] = 5.0
    x = torch.randn(4000, 8).abs()
    r.warmup.set_step(0)
    counts = torch.bincount(r(x).topk_ids_TK.flatten(), minlength=8)
    assert counts.max() < 1.3 * counts.float().mean()  # balanced up to sampling noise
    assert r.warmup.mean_std(r.warmup.first_moments)[1] > 1.0  # noise at the logits' own scale
    r.warmup.set_step(50)
    assert (r(x).topk_ids_TK == 0).any(-1).all()  # after W the learned (collapsed) router is back


@pytest.mark.parametrize("step", [50, 51, 1000])
def test_after_w_steps_logits_are_exactly_learned(step):
    m = MoE(8, num_experts=8, top_k=2, expert_hidden_size=8, routing_warmup=True, routing_warmup_steps=50).train()
    plain = MoE(8, num_experts=8, top_k=2, expert_hidden_size=8).train()
    plain.load_state_dict(m.state_dict(), strict=False)
    moe_start_step(m, step)
    x = torch.randn(6, 8)
    torch.manual_seed(0)
    out_warm = m.router(x)
    out_plain = plain.router(x)
    assert torch.equal(out_warm.scores_TE, out_plain.scores_TE)
    assert torch.equal(out_warm.topk_ids_TK, out_plain.topk_ids_TK)
    assert torch.equal(m(x), plain(x))


def test_eval_mode_uses_learned_logits():
    r = TopKRouter(8, 8, 2, routing_warmup_steps=10).eval()
    x = torch.randn(5, 8)
    r.warmup.set_step(0)
    torch.testing.assert_close(r(x).scores_TE, torch.softmax(x @ r.weight.T, -1))


def test_step_is_checkpointed():
    w = StochasticRoutingWarmup(4, 10)
    w.set_step(7)
    w2 = StochasticRoutingWarmup(4, 10)
    assert w2.blend() == 0.0
    w2.load_state_dict(w.state_dict())
    assert w2.blend() == 0.7


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_warmup_steps(steps):
    with pytest.raises(ValueError, match="routing_warmup_steps"):
        StochasticRoutingWarmup(4, steps)


def test_activation_checkpoint_recompute_matches_forward():
    from torch.utils.checkpoint import checkpoint

    m = MoE(8, num_experts=8, top_k=2, expert_hidden_size=8, routing_warmup=True, routing_warmup_steps=10).train()
    moe_start_step(m, 3)
    x = torch.randn(6, 8, requires_grad=True)
    y = checkpoint(m, x, use_reentrant=False)  # recompute must see the same noise and statistics
    y.sum().backward()
    assert float(m.router.warmup.pending_moments[0]) == 6 * 8  # staged once, not again by the recompute
