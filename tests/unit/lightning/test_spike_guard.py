"""Loss-spike guard in a real (single-process) Lightning run, faults injected by the FaultInjector callback."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from moe_plugin.lightning.callbacks.fault_injection import FaultInjector
from moe_plugin.lightning.callbacks.preemption import PreemptionCheckpoint
from moe_plugin.lightning.callbacks.spike import LossSpikeGuard, TrainingDivergedError, _Held
from moe_plugin.lightning.checkpoint_io import is_valid_checkpoint
from moe_plugin.lightning.events import read_events
from tests.unit.lightning.tiny import Probe, same_state, tiny_data, tiny_module, tiny_trainer

torch.set_num_threads(1)


def _run(tmp_path, faults, max_steps, **guard_kw):
    guard = LossSpikeGuard(warmup_steps=5, **guard_kw)
    probe = Probe()
    trainer = tiny_trainer([guard, FaultInjector(faults), probe], max_steps, tmp_path)
    module = tiny_module()
    trainer.fit(module, datamodule=tiny_data())
    return guard, probe, module


def _unchanged(rec) -> bool:
    return all(same_state(rec["before"][k], rec["after"][k]) for k in ("params", "optim", "sched"))


@pytest.mark.slow
def test_spike_skips_update_retries_batch_and_lowers_lr_on_repeat(tmp_path):
    # spike at step 8 (z >> 3 after 5 warm-up steps); the retry at step 9 spikes again
    guard, probe, _ = _run(
        tmp_path, [{"kind": "spike", "step": 8, "until": 10}], max_steps=12, grad_norm_threshold=None
    )
    r = {rec["step"]: rec for rec in probe.records}
    # step 8: update skipped, optimizer + scheduler + weights bit-for-bit unchanged
    assert not r[8]["has_grad"]
    assert [rec["step"] for rec in probe.records if rec["rejected"]] == [8]  # what later callbacks are told
    assert _unchanged(r[8])
    # the same batch is trained on again at step 9, now with lr * 0.5 (repeated spike), and applied
    assert torch.equal(r[9]["batch"], r[8]["batch"])
    assert r[9]["has_grad"] and not same_state(r[9]["before"]["params"], r[9]["after"]["params"])
    scheduled_lr_at_8 = r[8]["before"]["optim"]["param_groups"][0]["lr"]
    assert r[9]["lr_used"] == pytest.approx(0.5 * scheduled_lr_at_8, rel=1e-12)
    # the schedule did not advance on the skipped step: step 9 used step 8's scheduled LR (halved)
    assert r[9]["before"]["sched"]["last_epoch"] == r[8]["before"]["sched"]["last_epoch"]
    # step 10 is back to the schedule and trains on the batch displaced by the retry (no sample lost)
    assert r[10]["lr_used"] == r[9]["after"]["optim"]["param_groups"][0]["lr"]
    fresh_at_9 = [rec["batch"] for rec in probe.records if rec["step"] == 10][0]
    assert not torch.equal(fresh_at_9, r[8]["batch"])
    events = read_events(tmp_path / "events.jsonl")
    assert [(e["step"], e["event"], e["reason"]) for e in events] == [(8, "retry", "loss"), (9, "lower_lr", "loss")]
    assert events[0]["z"] > 3 and events[1]["lr_scale"] == 0.5
    assert guard.counts["skipped"] == 1 and guard.counts["lowered_lr"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad"])
def test_non_finite_never_reaches_weights(tmp_path, kind):
    guard, probe, module = _run(tmp_path, [{"kind": kind, "step": 3}], max_steps=6)
    r = {rec["step"]: rec for rec in probe.records}
    assert _unchanged(r[3])  # before warm-up too: non-finite is always rejected
    assert torch.equal(r[4]["batch"], r[3]["batch"])  # retried
    assert all(torch.isfinite(p).all() for p in module.parameters())
    for key, t in r[5]["after"]["optim"]["state"].items():
        assert all(torch.isfinite(v).all() for v in t.values() if isinstance(v, torch.Tensor)), key
    events = read_events(tmp_path / "events.jsonl")
    assert [(e["step"], e["event"], e["reason"]) for e in events] == [(3, "retry", "nonfinite")]


@pytest.mark.slow
def test_reinject_feeds_the_batch_later_and_loses_nothing(tmp_path):
    guard, probe, _ = _run(
        tmp_path,
        [{"kind": "spike", "step": 8}],
        max_steps=16,
        action="reinject",
        reinject_window=4,
        grad_norm_threshold=None,
    )
    batches = [rec["batch"] for rec in probe.records]
    spiked = batches[8]
    again = [i for i, b in enumerate(batches) if i > 8 and torch.equal(b, spiked)]
    assert len(again) == 1 and 9 <= again[0] <= 8 + 4 + 1
    # every batch before the spike plus every later batch: unique, none dropped except the ones still held
    keys = [tuple(b.flatten().tolist()) for i, b in enumerate(batches) if i != 8]
    assert len(set(keys)) == len(keys)
    assert read_events(tmp_path / "events.jsonl")[0]["event"] == "reinject"


@pytest.mark.slow
def test_consecutive_failures_stop_with_a_checkpoint_of_the_last_good_state(tmp_path):
    with pytest.raises(TrainingDivergedError, match="max_consecutive_failures=3") as info:
        _run(tmp_path, [{"kind": "nan_loss", "step": 4, "until": 100}], max_steps=20, max_consecutive_failures=3)
    path = tmp_path / "checkpoints" / "diverged-step000007.ckpt"
    assert str(path) in str(info.value)
    ckpt = torch.load(path, weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert ckpt["global_step"] == 7  # 4 applied updates + 3 rejected attempts
    assert is_valid_checkpoint(path) or path.exists()  # plain Lightning IO here: no sidecar, loadable
    assert read_events(tmp_path / "events.jsonl")[-1]["event"] == "stop"


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="callbacks.spike.action='bogus'"):
        LossSpikeGuard(action="bogus")
    with pytest.raises(ValueError, match="lr_factor"):
        LossSpikeGuard(lr_factor=0.0)
    with pytest.raises(ValueError, match="check_every_n_steps=0"):
        PreemptionCheckpoint(check_every_n_steps=0)
    with pytest.raises(ValueError, match="callbacks.fault_injection.faults\\[0\\].kind"):
        FaultInjector([{"kind": "meteor", "step": 1}])


def test_state_round_trip_keeps_detector_and_held_batches():
    g = LossSpikeGuard(warmup_steps=2)
    for x in (2.0, 2.1, 1.9):
        g.loss_detector.update(x)
    g.held = [_Held(torch.arange(6).view(2, 3), 1, 2)]
    h = LossSpikeGuard(warmup_steps=2)
    h.load_state_dict(g.state_dict())
    assert h.loss_detector.mean == g.loss_detector.mean and h.loss_detector.count == 3
    assert torch.equal(h.held[0].batch, g.held[0].batch) and (h.held[0].attempts, h.held[0].wait) == (1, 2)
    assert math.isfinite(h.loss_detector.var)


@pytest.mark.slow
def test_spike_and_straggler_events_reach_the_wandb_run(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from moe_plugin.lightning.callbacks.straggler import StragglerMonitor

    logger = WandbLogger(project="moe_plugin_test", save_dir=str(tmp_path), offline=True)
    callbacks = [LossSpikeGuard(warmup_steps=5, grad_norm_threshold=None), StragglerMonitor(every_n_steps=3)]
    callbacks.append(FaultInjector([{"kind": "spike", "step": 8}]))
    trainer = tiny_trainer(callbacks, 10, tmp_path, logger=logger, log_every_n_steps=1)
    trainer.fit(tiny_module(), datamodule=tiny_data())
    logger.experiment.finish()
    import time

    import wandb

    wandb.teardown()  # stops the W&B service, which writes the offline records
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    keys = (b"spike/event_z", b"spike/event_loss", b"spike/skipped_total", b"straggler/slowest_ratio")
    for _ in range(100):  # the record file may still be completing on a loaded machine
        records = next(run.glob("run-*.wandb")).read_bytes()
        if all(k in records for k in keys):
            break
        time.sleep(0.2)
    for key in keys:
        assert key in records, key


@pytest.mark.slow
def test_rejected_step_leaves_the_expert_bias_unchanged(tmp_path):
    from moe_plugin.layers.moe import moe_layers
    from moe_plugin.lightning.callbacks.router_updates import RouterUpdates
    from moe_plugin.models.decoder import MoEDecoderLM

    class BiasProbe(pl.Callback):
        def __init__(self):
            self.bias = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.bias[trainer.global_step] = moe_layers(pl_module)[0].router.expert_bias_E.clone()

    guard = LossSpikeGuard(warmup_steps=5, grad_norm_threshold=None)
    probe = BiasProbe()
    trainer = tiny_trainer([guard, FaultInjector([{"kind": "spike", "step": 8}]), RouterUpdates(), probe], 11, tmp_path)
    module = tiny_module()
    torch.manual_seed(0)
    module.model = MoEDecoderLM(
        vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, max_seq_len=64,
        moe={"num_experts": 4, "top_k": 2, "expert_hidden_size": 32, "expert_bias": True,
             "expert_bias_update_rate": 0.01},
    )  # fmt: skip
    trainer.fit(module, datamodule=tiny_data())
    # global_step after step s is s + 1: the bias moves on every applied step and not on the rejected step 8
    assert not torch.equal(probe.bias[8], probe.bias[7])
    assert torch.equal(probe.bias[9], probe.bias[8])
    assert not torch.equal(probe.bias[10], probe.bias[9])
