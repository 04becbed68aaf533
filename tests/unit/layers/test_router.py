"""Router: each option against a hand-written reference."""

from __future__ import annotations

import itertools

import torch

from moe_plugin.layers.router import TopKRouter


def _router(**kw) -> TopKRouter:
    torch.manual_seed(0)
    args = {"hidden_size": 8, "num_experts": 8, "top_k": 2}
    args.update(kw)
    r = TopKRouter(**args)
    with torch.no_grad():
        r.weight.normal_(std=1.0)
    return r


def test_softmax_topk_renormalised_like_mixtral():
    r = _router()
    x = torch.randn(5, 8)
    out = r(x)
    logits = x @ r.weight.T
    scores = torch.softmax(logits, -1)
    vals, ids = scores.topk(2, -1)
    torch.testing.assert_close(out.logits_TE, logits)
    torch.testing.assert_close(out.scores_TE, scores)
    assert torch.equal(out.topk_ids_TK, ids)
    torch.testing.assert_close(out.probs_TK, vals / vals.sum(-1, keepdim=True))
    assert out.probs_TK.dtype == torch.float32


def test_sigmoid_with_routing_scale():
    r = _router(score_func="sigmoid", routing_scale=2.5, norm_topk_prob=True)
    x = torch.randn(5, 8)
    out = r(x)
    scores = torch.sigmoid(x @ r.weight.T)
    vals, ids = scores.topk(2, -1)
    assert torch.equal(out.topk_ids_TK, ids)
    torch.testing.assert_close(out.probs_TK, 2.5 * vals / vals.sum(-1, keepdim=True))


def test_expert_bias_selects_but_does_not_weight():
    r = _router(expert_bias=True, norm_topk_prob=False)
    x = torch.randn(6, 8)
    plain = r(x)
    with torch.no_grad():
        r.expert_bias_E[5] = 10.0  # forces expert 5 into every token's top-k
    biased = r(x)
    assert (biased.topk_ids_TK == 5).any(-1).all()
    torch.testing.assert_close(biased.probs_TK, plain.scores_TE.gather(1, biased.topk_ids_TK))
    torch.testing.assert_close(biased.scores_TE, plain.scores_TE)


def test_group_limited_routing_matches_brute_force():
    G, TG, K = 4, 2, 3
    r = _router(num_expert_groups=G, topk_groups=TG, top_k=K, score_func="sigmoid")
    x = torch.randn(20, 8)
    out = r(x)
    scores = torch.sigmoid(x @ r.weight.T)
    for t in range(20):
        groups = scores[t].view(G, 2)
        group_score = groups.topk(2, -1).values.sum(-1)
        best_groups = set(group_score.topk(TG).indices.tolist())
        allowed = [e for e in range(8) if e // 2 in best_groups]
        best = max(itertools.combinations(allowed, K), key=lambda c: sum(scores[t, list(c)]))
        assert set(out.topk_ids_TK[t].tolist()) == set(best)


def test_jitter_only_in_training():
    r = _router(jitter=0.5)
    x = torch.randn(4, 8)
    r.eval()
    torch.testing.assert_close(r(x).logits_TE, x @ r.weight.T)
    r.train()
    assert not torch.allclose(r(x).logits_TE, x @ r.weight.T)


def test_router_math_is_float32_for_bfloat16_inputs():
    r = _router().to(torch.bfloat16)
    out = r(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.logits_TE.dtype == out.scores_TE.dtype == out.probs_TK.dtype == torch.float32


def test_gradient_flows_to_router_through_probs():
    r = _router()
    r(torch.randn(4, 8)).probs_TK[:, 0].sum().backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_router_math_is_float32_under_autocast() -> None:
    import torch

    from moe_plugin.layers.router import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(32, 8, 2)
    x = torch.randn(64, 32)
    ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x)
    assert out.logits_TE.dtype == torch.float32 and out.scores_TE.dtype == torch.float32
    torch.testing.assert_close(out.logits_TE, ref.logits_TE)
    assert torch.equal(out.topk_ids_TK, ref.topk_ids_TK)
