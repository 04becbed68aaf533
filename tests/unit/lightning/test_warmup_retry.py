"""A step the loss-spike guard rejects leaves the routing warmup untouched, so its retry equals a clean step.

Two single-process Lightning runs of a tiny Ling-style model with the Stochastic Routing Warmup on (active
for the whole run): a clean one of 11 steps, and one where a loss spike is injected at step 8, rejected by
the guard and retried at step 9 (12 attempts, 11 applied updates). After the run both models, warmup buffers
included, are bit-for-bit equal: the retry routed exactly like the clean step (same noise keys, the
statistics and the warmup step count unchanged by the rejected attempt).
"""

from __future__ import annotations

import pytest
import torch

from moe_plugin.layers.moe import moe_layers
from moe_plugin.lightning.callbacks.fault_injection import FaultInjector
from moe_plugin.lightning.callbacks.router_updates import RouterUpdates
from moe_plugin.lightning.callbacks.spike import LossSpikeGuard
from moe_plugin.models.decoder import MoEDecoderLM
from tests.unit.lightning.tiny import tiny_data, tiny_module, tiny_trainer

torch.set_num_threads(1)


def _ling_module():
    module = tiny_module()
    torch.manual_seed(0)
    module.model = MoEDecoderLM(
        vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, max_seq_len=64,
        moe={"num_experts": 4, "top_k": 2, "expert_hidden_size": 32, "num_shared_experts": 1,
             "routing_warmup": True, "routing_warmup_steps": 40},
    )  # fmt: skip
    return module


def _fit(tmp_path, faults, max_steps):
    guard = LossSpikeGuard(warmup_steps=5, grad_norm_threshold=None)
    module = _ling_module()
    trainer = tiny_trainer([guard, FaultInjector(faults), RouterUpdates(seed=11)], max_steps, tmp_path)
    trainer.fit(module, datamodule=tiny_data())
    return guard, module


@pytest.mark.slow
def test_spike_retry_equals_a_clean_step(tmp_path):
    _, clean = _fit(tmp_path / "clean", [], 11)
    guard, retried = _fit(tmp_path / "spike", [{"kind": "spike", "step": 8}], 12)
    assert guard.counts["skipped"] == 1 and guard.counts["retried"] == 1 and guard.counts["lowered_lr"] == 0
    for layer in moe_layers(retried):
        w = layer.router.warmup
        assert int(w.step) == 11 and int(w.num_updates) == 11  # the rejected attempt was not counted
    want, got = clean.state_dict(), retried.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_router_updates_must_come_after_the_guard(tmp_path):
    trainer = tiny_trainer([RouterUpdates(), LossSpikeGuard()], 1, tmp_path)
    with pytest.raises(ValueError, match="RouterUpdates is listed before LossSpikeGuard"):
        trainer.fit(_ling_module(), datamodule=tiny_data())
