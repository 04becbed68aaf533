"""Activation checkpointing: same loss, gradients and routing statistics as without it, less saved activation.

Router jitter and Ling's stochastic routing warmup are on (both draw random numbers in the forward, the
warmup also stages its statistics): the recomputation must draw the same noise and must not stage the
statistics a second time. Saved activations are measured with autograd's saved-tensor hooks (bytes
held for backward after the forward).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_plugin.layers.moe import collect_aux_losses, moe_layers
from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.parallel.recompute import apply_activation_checkpointing, check_activation_checkpointing


def _model() -> MoEDecoderLM:
    torch.manual_seed(0)
    moe = {
        "num_experts": 4,
        "top_k": 2,
        "expert_hidden_size": 64,
        "num_shared_experts": 1,
        "router_jitter": 0.1,
        "routing_warmup": True,
        "routing_warmup_steps": 10,
    }
    model = MoEDecoderLM(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, head_dim=16, moe=moe)
    for layer in moe_layers(model):
        layer.router.warmup.set_step(3)  # halfway through the warmup: noise and learned logits blended
        layer.stats.track_totals = True  # running totals (what the ExpertLoad callback turns on)
    return model


def _step(model: MoEDecoderLM, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Loss after forward + backward, and the bytes autograd saved for backward during the forward."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(42)  # the forward's noise
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1)) + collect_aux_losses(model)
    torch.manual_seed(7)  # backward-time RNG differs: recompute must restore the forward's own state
    loss.backward()
    return loss.detach(), saved[0]


@pytest.mark.parametrize(
    ("mode", "target", "every"),
    [("full", "blocks", 1), ("selective", "blocks", 2), ("selective", "experts", 1)],
)
def test_recompute_matches_no_recompute(mode: str, target: str, every: int) -> None:
    batch = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))
    ref = _model()
    ref_loss, ref_saved = _step(ref, batch)
    model = _model()
    names = apply_activation_checkpointing(model, mode, target, every)
    assert names and (target == "experts") == all(n.endswith("experts") for n in names)
    loss, saved = _step(model, batch)
    assert torch.equal(loss, ref_loss)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    # statistics updated once per forward (not again by the recomputation), counters not doubled
    for layer, ref_layer in zip(moe_layers(model), moe_layers(ref)):
        w, rw = layer.router.warmup, ref_layer.router.warmup
        assert float(w.pending_moments[0]) == float(rw.pending_moments[0]) == 4 * 32 * 4  # staged once: B*S*E
        assert torch.equal(w.pending_moments, rw.pending_moments)
        assert layer.stats.total_copies == ref_layer.stats.total_copies > 0
        assert torch.equal(layer.stats.total_tokens_per_expert_E, ref_layer.stats.total_tokens_per_expert_E)
    assert saved < ref_saved  # fewer activations held between forward and backward
    if mode == "full":
        assert saved < 0.5 * ref_saved


def test_parameter_names_unchanged_and_eval_not_checkpointed() -> None:
    model = _model()
    before = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model, "full")
    apply_activation_checkpointing(model, "full")  # idempotent
    assert [n for n, _ in model.named_parameters()] == before
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (("some", "blocks", 1), "model.activation_checkpointing='some'"),
        (("selective", "heads", 1), "model.activation_checkpointing_target='heads'"),
        (("selective", "blocks", 0), "model.activation_checkpointing_every=0"),
    ],
)
def test_bad_values_name_the_key(args: tuple, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace("(", r"\(")):
        check_activation_checkpointing(*args)
