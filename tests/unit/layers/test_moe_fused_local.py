"""The MoE layer with `fuse_local_routing` (kernels/local_moe.py through GroupedExperts.local_routed) against the
same layer with the separate permute -> experts -> combine steps: outputs, every gradient, aux losses and
routing statistics; which configurations take the fused path; activation checkpointing through decoder
blocks; and training losses of a whole model over a few optimizer steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_plugin.layers.dispatcher import LocalDispatcher
from moe_plugin.layers.moe import MoE, collect_aux_losses, moe_layers
from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.parallel.recompute import apply_activation_checkpointing

sys.path.insert(0, str(Path(__file__).parent))
from moe_reference import small_moe  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 1e-5}


_layer = small_moe


def _spy(m: MoE) -> list[int]:
    calls: list[int] = []
    inner = m.experts.local_routed

    def local_routed(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    m.experts.local_routed = local_routed  # type: ignore[method-assign]
    return calls


def _pass(m: MoE, x: torch.Tensor, fused: bool):
    m.fuse_local_routing = fused
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = m(x)
    torch.manual_seed(1)
    (y * torch.randn_like(y)).sum().add(m.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    stats = (m.stats.tokens_per_expert_E.clone(), {k: float(v) for k, v in m.stats.losses.items()})
    return y.detach(), x.grad.clone(), grads, m.aux_loss.detach(), stats


CONFIGS = {
    "coarse": {},
    "fine": {"num_experts": 16, "top_k": 6, "expert_hidden_size": 8},
    "top1": {"top_k": 1},
    "sigmoid_groups": {"score_func": "sigmoid", "num_expert_groups": 4, "topk_groups": 2, "top_k": 3},
    "shared_gated": {"num_shared_experts": 1, "shared_expert_gate": True},
    "no_renorm_scaled": {"norm_topk_prob": False, "routing_scale": 2.0},
    "backend_mm": {"grouped_mm_backend": "mm"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_matches_separate_steps(name):
    m = _layer(**CONFIGS[name])
    calls = _spy(m)
    x = torch.randn(3, 20, 16)
    ref = _pass(m, x, fused=False)
    assert not calls
    fused = _pass(m, x, fused=True)
    assert calls  # the fused path ran
    for a, b in ((fused[0], ref[0]), (fused[1], ref[1]), (fused[3], ref[3])):
        torch.testing.assert_close(a, b, **TOL)
    assert fused[2].keys() == ref[2].keys()
    for n in ref[2]:
        torch.testing.assert_close(fused[2][n], ref[2][n], **TOL, msg=lambda msg, n=n: f"{n}: {msg}")
    assert torch.equal(fused[4][0], ref[4][0]) and fused[4][1] == pytest.approx(ref[4][1], rel=1e-6)


def test_skewed_routing_and_empty_experts():
    m = _layer(num_experts=8, top_k=2)
    with torch.no_grad():  # expert 3 is everyone's first choice, experts 5-7 nobody's
        m.router.weight[3] += 5.0
        m.router.weight[5:] -= 5.0
    x = torch.randn(40, 16).abs()
    ref, fused = _pass(m, x, False), _pass(m, x, True)
    torch.testing.assert_close(fused[0], ref[0], **TOL)
    for n in ref[2]:
        torch.testing.assert_close(fused[2][n], ref[2][n], **TOL)


class _OtherLocalDispatcher(LocalDispatcher):
    """A dispatcher that merely looks local: the fused path must not assume it is the identity."""


@pytest.mark.parametrize(
    "setup",
    [
        lambda m: setattr(m, "capacity_factor", 1.0),
        lambda m: setattr(m.experts, "grouped_mm_backend", "loop"),
        lambda m: setattr(m, "dispatcher", _OtherLocalDispatcher(m.num_experts)),
        lambda m: setattr(m, "fuse_local_routing", False),
    ],
    ids=["capacity", "loop_backend", "other_dispatcher", "switched_off"],
)
def test_other_configurations_keep_the_separate_steps(setup):
    m = _layer()
    m.fuse_local_routing = True
    calls = _spy(m)
    setup(m)
    m(torch.randn(10, 16)).sum().backward()
    assert not calls


def test_default_is_off():
    assert _layer().fuse_local_routing is False


def _model(fused: bool) -> MoEDecoderLM:
    torch.manual_seed(0)
    moe = {"num_experts": 8, "top_k": 3, "expert_hidden_size": 24, "router_jitter": 0.1}
    model = MoEDecoderLM(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, moe=moe)
    for layer in moe_layers(model):
        layer.fuse_local_routing = fused
        layer.stats.track_totals = True
    return model


def _loss(model: MoEDecoderLM, batch: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(42)  # the router jitter's noise
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1)) + collect_aux_losses(model)


def test_activation_checkpointing_recomputes_the_fused_path():
    batch = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    ref, model = _model(fused=False), _model(fused=True)
    apply_activation_checkpointing(model, "full")
    calls = [_spy(layer) for layer in moe_layers(model)]
    torch.manual_seed(7)
    _loss(ref, batch).backward()
    loss = _loss(model, batch)
    torch.manual_seed(7)
    loss.backward()
    assert all(len(c) == 2 for c in calls)  # forward, then the recomputation in backward
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, n=n: f"{n}: {m}")
    for layer, ref_layer in zip(moe_layers(model), moe_layers(ref)):  # counted once, not again by recompute
        assert layer.stats.total_copies == ref_layer.stats.total_copies > 0
        assert torch.equal(layer.stats.total_tokens_per_expert_E, ref_layer.stats.total_tokens_per_expert_E)


def test_training_losses_match_the_separate_steps():
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 64, (4, 17), generator=gen)] * 4  # one batch: the loss must fall
    losses = {}
    for fused in (False, True):
        model = _model(fused)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[fused] = []
        for batch in batches:
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            opt.step()
            losses[fused].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)
    assert losses[True][-1] < losses[True][0]


def test_bf16_autocast_matches_separate_steps():
    m = _layer(num_experts=16, top_k=6, expert_hidden_size=8)
    x = torch.randn(30, 16)
    outs = {}
    for fused in (False, True):
        m.fuse_local_routing = fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[fused] = m(x)
    assert outs[True].dtype == outs[False].dtype
    torch.testing.assert_close(outs[True].float(), outs[False].float(), atol=0.05, rtol=0.05)
