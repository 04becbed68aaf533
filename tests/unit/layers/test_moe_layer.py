"""The MoE layer against the dense "every expert, mixed by weights" reference and the loop reference,
outputs and gradients, fp32, tolerance 1e-5, for each routing option and grouped-matmul backend."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moe_plugin.layers.moe import MoE, collect_aux_losses, moe_layers, moe_start_step

sys.path.insert(0, str(Path(__file__).parent))
from moe_reference import dense_moe_reference, loop_moe_reference, small_moe  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 1e-5}


_layer = small_moe


def _grads(m: MoE, x: torch.Tensor, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = fn(m, x)
    torch.manual_seed(1)
    (y * torch.randn_like(y)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, x.grad.clone()


def _assert_same(a, b):
    y_a, g_a, gx_a = a
    y_b, g_b, gx_b = b
    torch.testing.assert_close(y_a, y_b, **TOL)
    torch.testing.assert_close(gx_a, gx_b, **TOL)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


CONFIGS = {
    "softmax_renorm": {},
    "softmax_no_renorm": {"norm_topk_prob": False},
    "sigmoid_scaled": {"score_func": "sigmoid", "routing_scale": 2.5},
    "groups": {"num_experts": 8, "num_expert_groups": 4, "topk_groups": 2, "top_k": 3},
    "shared_gated": {"num_shared_experts": 2, "shared_expert_hidden_size": 6, "shared_expert_gate": True},
    "top1": {"top_k": 1},
}


@pytest.mark.parametrize("backend", ["mm", "torch", "loop"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_path_matches_dense_and_loop_references(name, backend):
    m = _layer(grouped_mm_backend=backend, **CONFIGS[name])
    x = torch.randn(3, 10, 16)
    fast = _grads(m, x, lambda m, x: m(x))
    _assert_same(fast, _grads(m, x, dense_moe_reference))
    _assert_same(fast, _grads(m, x, loop_moe_reference))


def test_expert_bias_changes_selection_not_weights_and_matches_reference():
    m = _layer(expert_bias=True, score_func="sigmoid")
    moe_start_step(m, 0)
    with torch.no_grad():
        m.router.expert_bias_E.copy_(torch.linspace(-0.3, 0.3, 8))
    x = torch.randn(2, 12, 16)
    _assert_same(_grads(m, x, lambda m, x: m(x)), _grads(m, x, dense_moe_reference))


def test_empty_experts_get_zero_gradient_not_none():
    m = _layer(num_experts=8, top_k=1)
    with torch.no_grad():  # route everything to expert 3
        m.router.weight.zero_()
        m.router.weight[3] = 1.0
    x = torch.randn(5, 16).abs() + 0.1
    m(x).sum().backward()
    assert m.experts.w_up_EDF.grad is not None
    assert torch.count_nonzero(m.experts.w_up_EDF.grad[[0, 1, 2, 4, 5, 6, 7]]) == 0
    assert torch.count_nonzero(m.experts.w_up_EDF.grad[3]) > 0


def test_capacity_drop_counting_and_outputs():
    # 6 tokens, all routed to expert 0 first and expert 1 second; capacity C = ceil(1.0 * 6 * 2 / 4) = 3.
    m = _layer(num_experts=4, top_k=2, capacity_factor=1.0, drop_policy="position", norm_topk_prob=False)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 2.0
        m.router.weight[1, 0] = 1.0
    x = torch.randn(6, 16)
    x[:, 0] = torch.linspace(1.0, 2.0, 6)
    y = m(x)
    assert m.stats.tokens_per_expert_E.tolist() == [6, 6, 0, 0]
    assert int(m.stats.dropped) == 6  # 3 of each expert's 6 copies
    keep_TK = torch.zeros(6, 2)
    keep_TK[:3] = 1.0  # "position": the first 3 tokens keep both copies
    torch.testing.assert_close(y, dense_moe_reference(m, x, keep_TK), **TOL)


def test_capacity_drop_policy_probs_keeps_largest_weights():
    m = _layer(num_experts=4, top_k=1, capacity_factor=1.0, drop_policy="probs", norm_topk_prob=False)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 1.0
    x = torch.randn(8, 16)
    x[:, 0] = torch.tensor([0.1, 3.0, 0.2, 2.0, 0.3, 1.0, 0.4, 0.05])  # larger x0 -> larger prob of expert 0
    y = m(x)
    # C = ceil(8 * 1 / 4) = 2: tokens 1 and 3 (largest probs) keep their copy.
    keep_TK = torch.zeros(8, 1)
    keep_TK[[1, 3]] = 1.0
    assert int(m.stats.dropped) == 6
    torch.testing.assert_close(y, dense_moe_reference(m, x, keep_TK), **TOL)


def test_capacity_large_enough_drops_nothing_and_equals_dropless():
    m = _layer(capacity_factor=8.0)
    x = torch.randn(20, 16)
    y = m(x)
    assert int(m.stats.dropped) == 0
    m.capacity_factor = None
    torch.testing.assert_close(y, m(x), **TOL)


def test_losses_and_statistics_recorded():
    m = _layer()
    m.train()
    x = torch.randn(4, 8, 16)
    m(x)
    assert m.stats.tokens_per_expert_E.sum() == 4 * 8 * 2
    assert set(m.stats.losses) == {"balance_loss", "z_loss", "router_entropy"}
    expected = 0.015 * m.stats.losses["balance_loss"] + 1e-4 * m.stats.losses["z_loss"]
    torch.testing.assert_close(m.aux_loss.detach(), expected)
    assert m.aux_loss.requires_grad
    assert m.stats.total_tokens_per_expert_E is None  # nothing tracks totals: nothing accumulated
    assert m.stats.step_tokens_per_expert_E is None  # micro-batch loss, no expert bias: no step window
    m.stats.track_totals = m.stats.track_step = True  # what ExpertLoad / a global-batch loss switch on
    m(x)
    m(x)
    assert m.stats.total_tokens_per_expert_E.sum() == 2 * 64 and m.stats.total_copies == 128
    assert m.stats.step_tokens_per_expert_E.sum() == 128  # two micro-batches in the same step
    assert int(m.stats.total_dropped) == 0
    moe_start_step(m, 1)
    assert m.stats.step_tokens_per_expert_E is None
    model = torch.nn.Sequential(m, _layer())
    model(x)
    assert moe_layers(model) == [model[0], model[1]]
    torch.testing.assert_close(collect_aux_losses(model), model[0].aux_loss + model[1].aux_loss)
    assert collect_aux_losses(torch.nn.Linear(2, 2)) is None


def test_eval_forward_does_not_count():
    m = _layer().eval()
    m.stats.track_totals = m.stats.track_step = True
    m(torch.randn(5, 16))
    assert m.stats.total_tokens_per_expert_E is None and m.stats.step_tokens_per_expert_E is None
    assert m.stats.tokens_per_expert_E.sum() == 10


def test_global_batch_loss_uses_step_counts_and_reduce():
    m = _layer(balance_loss_type="global_batch")
    moe_start_step(m, 0)
    x1, x2 = torch.randn(6, 16), torch.randn(6, 16)
    m(x1)
    c1 = m.stats.tokens_per_expert_E
    m(x2)
    c2 = m.stats.tokens_per_expert_E
    from moe_plugin.layers.losses import load_balancing_loss

    scores = m.router(x2).scores_TE
    torch.testing.assert_close(m.stats.losses["balance_loss"], load_balancing_loss(scores, c1 + c2).detach())
    # A reduce hook (what expert parallelism sets) sees the accumulated counts.
    seen = []
    m.count_reduce = lambda c: (seen.append(c.clone()), 2 * c)[1]
    m(x1)
    assert torch.equal(seen[0], c1 + c2 + c1)


def test_sequence_loss_uses_batch_structure():
    m = _layer(balance_loss_type="sequence")
    x = torch.randn(3, 7, 16)
    m(x)
    from moe_plugin.layers.losses import sequence_load_balancing_loss

    r = m.router(x.reshape(-1, 16))
    expected = sequence_load_balancing_loss(r.scores_TE.view(3, 7, 8), r.topk_ids_TK.view(3, 7, 2))
    torch.testing.assert_close(m.stats.losses["balance_loss"], expected.detach())


def test_warns_once_when_step_driver_missing():
    m = _layer(expert_bias=True).train()
    with pytest.warns(UserWarning, match="RouterUpdates"):
        m(torch.randn(4, 16))
    moe_start_step(m, 0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(4, 16))


def test_bfloat16_layer_runs_router_in_float32():
    m = _layer().to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    ref = dense_moe_reference(m.float(), x.detach().float())
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"balance_loss_type": "batch"}, "model.moe.balance_loss_type='batch'"),
        ({"capacity_factor": 0.0}, "model.moe.capacity_factor=0.0"),
        ({"drop_policy": "random"}, "model.moe.drop_policy='random'"),
        ({"routing_warmup": True}, "routing_warmup_steps"),
        ({"score_func": "relu"}, "score_func='relu'"),
        ({"top_k": 9}, "top_k=9"),
        ({"num_expert_groups": 3}, "num_expert_groups=3"),
        ({"num_expert_groups": 4, "topk_groups": 1, "top_k": 3}, "raise topk_groups"),
        ({"grouped_mm_backend": "cutlass"}, "grouped_mm_backend='cutlass'"),
        ({"aux_loss_coef": -1.0}, "aux_loss_coef=-1.0"),
        ({"router_jitter": 1.5}, "router_jitter=1.5"),
    ],
)
def test_bad_arguments_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        _layer(**kw)


def test_experts_without_dispatcher_must_be_complete():
    from moe_plugin.layers.experts import GroupedExperts

    m = _layer()
    m.experts = GroupedExperts(4, 16, 12, expert_offset=4)
    with pytest.raises(RuntimeError, match="must install a matching dispatcher"):
        m(torch.randn(3, 16))


def test_activation_checkpoint_recompute_is_not_counted_twice():
    from torch.utils.checkpoint import checkpoint

    m = _layer().train()
    m.stats.track_totals = m.stats.track_step = True
    moe_start_step(m, 0)
    x = torch.randn(6, 16, requires_grad=True)
    y = checkpoint(m, x, use_reentrant=False)
    aux = m.aux_loss
    (y.sum() + aux).backward()
    assert m.stats.total_tokens_per_expert_E.sum() == 12 and m.stats.step_tokens_per_expert_E.sum() == 12
    assert m.router.weight.grad is not None


@pytest.mark.parametrize("tokens", [4, 400])  # few copies: separate gate/up GEMMs; many: one fused GEMM
def test_fused_and_separate_gate_up_match_reference(tokens):
    from moe_plugin.layers.experts import fuse_gate_up

    m = _layer()
    assert fuse_gate_up(8, 16, tokens * 2) == (tokens == 400)
    x = torch.randn(tokens, 16)
    _assert_same(_grads(m, x, lambda m, x: m(x)), _grads(m, x, dense_moe_reference))


def test_combine_gradients_match_reference_unpermute():
    from moe_plugin.layers.permute import permute, unpermute, unpermute_reference

    torch.manual_seed(0)
    x = torch.randn(9, 5)
    ids = torch.randint(0, 4, (9, 3))
    p = permute(x, ids, 4)
    y1 = torch.randn(27, 5, requires_grad=True)
    w1 = torch.rand(9, 3, requires_grad=True)
    y2, w2 = y1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    g = torch.randn(9, 5)
    out1, out2 = unpermute(y1, w1, p.state), unpermute_reference(y2, w2, p.state)
    torch.testing.assert_close(out1, out2, **TOL)
    out1.backward(g)
    out2.backward(g)
    torch.testing.assert_close(y1.grad, y2.grad, **TOL)
    torch.testing.assert_close(w1.grad, w2.grad, **TOL)


@pytest.mark.parametrize("need", ["both", "y", "probs"])
def test_dropless_combine_backward_over_several_blocks_matches_reference(need):
    # 1100 tokens x top-3 = 3300 copies: more than one block of the gather-only backward (2048 rows)
    from moe_plugin.layers.permute import permute, unpermute, unpermute_reference

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1100, 8, generator=gen)
    ids = torch.randint(0, 5, (1100, 3), generator=gen)
    p = permute(x, ids, 5)
    assert p.state.dropless
    y1 = torch.randn(3300, 8, generator=gen).requires_grad_(need in ("both", "y"))
    w1 = torch.rand(1100, 3, generator=gen).requires_grad_(need in ("both", "probs"))
    y2, w2 = y1.detach().clone().requires_grad_(y1.requires_grad), w1.detach().clone().requires_grad_(w1.requires_grad)
    g = torch.randn(1100, 8, generator=gen)
    out1, out2 = unpermute(y1, w1, p.state), unpermute_reference(y2, w2, p.state)
    torch.testing.assert_close(out1, out2, **TOL)
    out1.backward(g)
    out2.backward(g)
    for a, b in ((y1, y2), (w1, w2)):
        assert (a.grad is None) == (not a.requires_grad)
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_routing_stats_are_references_and_computed_on_read():
    from moe_plugin.layers.losses import router_entropy

    m = _layer().train()
    x = torch.randn(10, 16)
    m(x)
    s = m.stats
    assert s._losses is None  # nothing read yet: the entropy was not computed
    scores = m.router(x).scores_TE
    torch.testing.assert_close(s.losses["router_entropy"], router_entropy(scores))
    assert s._scores_TE is None  # the scores are released once the entropy is known
    assert int(s.dropped) == 0 and s.num_copies == 20
    assert s.tokens_per_expert_E is s.kept_per_expert_E or torch.equal(s.tokens_per_expert_E, s.kept_per_expert_E)
    s.clear()
    assert s.losses == {} and s.dropped is None
