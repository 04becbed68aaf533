"""Routing-warmup exactness (issue 11): keyed noise and step-level statistics.

- The noise is a pure function of (seed, step, layer, global token index, expert): the same token gets the
  same value however the batch is split over ranks and micro-batches, and the int64 hash equals an exact
  Python reference. Its distribution is standard normal.
- The statistics change only when a step is committed as accepted; a rejected step leaves every buffer and
  the step count as they were, so the retry routes exactly like a clean step.
- Two "ranks" (halves of a batch, moments summed by a reduce function) give bit-identical warmup outputs and
  statistics to one process on the whole batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_plugin.layers.moe import MoE
from moe_plugin.layers.routing_warmup import (
    NoiseKeys,
    StochasticRoutingWarmup,
    commit_routing_warmup,
    keyed_normal,
    mix64,
    mix64_int,
    set_noise_keys,
)


def test_int64_hash_equals_exact_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**63), 2**63 - 1, (2000,), dtype=torch.int64, generator=g)
    x = torch.cat([x, torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)])])
    got = mix64(x).tolist()
    want = [mix64_int(v & ((1 << 64) - 1)) for v in x.tolist()]
    assert [v & ((1 << 64) - 1) for v in got] == want


def test_noise_depends_only_on_its_keys_not_on_the_batch_split():
    tokens = torch.arange(3000, dtype=torch.int64)
    whole = keyed_normal(7, 3, 1, tokens, 8)
    parts = torch.cat(
        [keyed_normal(7, 3, 1, tokens[a:b], 8) for a, b in [(0, 1), (1, 1000), (1000, 2999), (2999, 3000)]]
    )
    assert torch.equal(whole, parts)
    shuffled = tokens[torch.randperm(3000)]
    assert torch.equal(keyed_normal(7, 3, 1, shuffled, 8), whole[shuffled])
    for other in [(8, 3, 1), (7, 4, 1), (7, 3, 2)]:  # another seed, step or layer: uncorrelated noise
        corr = torch.corrcoef(torch.stack([whole.flatten(), keyed_normal(*other, tokens, 8).flatten()]))[0, 1]
        assert abs(float(corr)) < 0.03, other
    # experts of one token are uncorrelated too
    assert abs(float(torch.corrcoef(whole[:, :2].T)[0, 1])) < 0.05


def test_noise_is_standard_normal():
    eps = keyed_normal(1234, 0, 0, torch.arange(100_000), 8).double().flatten()  # 800k values
    assert eps.dtype == torch.float64 and torch.isfinite(eps).all()
    assert abs(float(eps.mean())) < 5e-3 and abs(float(eps.std()) - 1.0) < 5e-3
    for k, p in [(1.0, 0.682689), (2.0, 0.954500), (3.0, 0.997300)]:
        assert abs(float((eps.abs() < k).double().mean()) - p) < 3e-3, k
    # the cdf at a few points (a coarse Kolmogorov-Smirnov check)
    for q in (-1.5, -0.5, 0.0, 0.7, 1.8):
        want = 0.5 * (1 + math.erf(q / math.sqrt(2)))
        assert abs(float((eps < q).double().mean()) - want) < 3e-3


def _warmup(step: int = 3) -> StochasticRoutingWarmup:
    w = StochasticRoutingWarmup(8, warmup_steps=10, momentum=0.9).train()
    w.set_step(step)
    return w


def test_two_ranks_equal_one_process_bit_for_bit():
    """One process on 8 samples x 5 tokens vs two 'ranks' with 4 samples each and summed moments, over a
    step-0 forward (moments of the micro-batch) and two committed steps."""
    S, E = 5, 8
    one, r0, r1 = _warmup(0), _warmup(0), _warmup(0)
    for step in range(3):
        logits_TE = torch.randn(8 * S, E) * 2 + 0.5
        halves = logits_TE.view(8, S, E)[:4].reshape(-1, E), logits_TE.view(8, S, E)[4:].reshape(-1, E)
        one.keys = NoiseKeys(seed=5, first_sample=0)
        out = one(logits_TE, S)
        m0, m1 = StochasticRoutingWarmup.moments(halves[0]), StochasticRoutingWarmup.moments(halves[1])
        outs = []
        for w, first, x in [(r0, 0, halves[0]), (r1, 4, halves[1])]:
            w.keys = NoiseKeys(seed=5, first_sample=first, reduce=lambda m: m0 + m1)
            outs.append(w(x, S))
        assert torch.equal(out, torch.cat(outs)), step
        commit_routing_warmup(one)
        pending = r0.pending_moments + r1.pending_moments
        for w in (r0, r1):
            commit_routing_warmup(w, reduce=lambda t, p=pending: p[None])
        for w in (r0, r1):
            assert torch.equal(w.logit_mean, one.logit_mean) and torch.equal(w.logit_std, one.logit_std)
            assert int(w.step) == int(one.step) == step + 1


def test_gradient_accumulation_split_gives_the_same_noise_and_statistics():
    S, E = 4, 8
    one, acc = _warmup(), _warmup()
    for w in (one, acc):  # committed statistics first
        w(torch.randn(16, E))
        commit_routing_warmup(w, reduce=lambda t: t * 0 + StochasticRoutingWarmup.moments(torch.ones(4, 4)))
    logits_TE = torch.randn(6 * S, E)
    one.keys = NoiseKeys(seed=1, first_sample=0)
    out = one(logits_TE, S)
    outs = []
    for m in range(3):  # 3 micro-batches of 2 samples (one rank)
        acc.keys = NoiseKeys(seed=1, first_sample=2 * m)
        outs.append(acc(logits_TE[m * 2 * S : (m + 1) * 2 * S], S))
    assert torch.equal(out, torch.cat(outs))
    commit_routing_warmup(one)
    commit_routing_warmup(acc)
    torch.testing.assert_close(acc.logit_mean, one.logit_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(acc.logit_std, one.logit_std, rtol=0, atol=1e-7)


def test_rejected_step_changes_nothing_and_its_retry_equals_a_clean_step():
    torch.manual_seed(0)
    m = MoE(16, num_experts=8, top_k=2, expert_hidden_size=16, routing_warmup=True, routing_warmup_steps=10).train()
    m.start_step()
    m(torch.randn(2, 6, 16))
    commit_routing_warmup(m)  # step 0 accepted: statistics exist
    set_noise_keys(m, NoiseKeys(seed=3, first_sample=0))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 6, 16)
    first = m(x)
    bad = torch.randn(2, 6, 16) * 50  # a step that gets rejected, with very different logits
    m(bad)
    commit_routing_warmup(m, accepted=False)
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert float(m.router.warmup.pending_moments.abs().sum()) == 0
    retry = m(x)
    assert torch.equal(first, retry)  # same step, same keys, same statistics: the same routing


def test_steps_keys_and_layers_change_the_routing():
    m = MoE(16, num_experts=8, top_k=2, expert_hidden_size=16, routing_warmup=True, routing_warmup_steps=10).train()
    m.start_step()
    x = torch.randn(2, 6, 16)
    set_noise_keys(m, NoiseKeys(seed=3, first_sample=0))
    a = m(x)
    set_noise_keys(m, NoiseKeys(seed=3, first_sample=2))  # another global position: other noise
    assert not torch.equal(a, m(x))
    set_noise_keys(m, NoiseKeys(seed=4, first_sample=0))
    assert not torch.equal(a, m(x))
    set_noise_keys(m, NoiseKeys(seed=3, first_sample=0))
    assert torch.equal(a, m(x))


def test_layers_get_their_index_in_module_order():
    model = torch.nn.Sequential(
        *[MoE(8, num_experts=4, top_k=1, routing_warmup=True, routing_warmup_steps=5) for _ in range(3)]
    )
    set_noise_keys(model, NoiseKeys(seed=1))
    assert [layer.router.warmup.layer_index for layer in model] == [0, 1, 2]


@pytest.mark.parametrize("accepted", [True, False])
def test_finished_warmup_keeps_counting_without_statistics(accepted):
    w = _warmup(10)
    logits = torch.randn(4, 8)
    assert torch.equal(w(logits), logits)
    commit_routing_warmup(w, accepted=accepted, reduce=lambda t: pytest.fail("no collective once the warmup is over"))
    assert int(w.step) == (11 if accepted else 10) and int(w.num_updates) == 0
