"""local_sgd's island-scoped SIGTERM agreement (lightning/strategies/local_sgd_sigterm.py) on a real Trainer, and
the outer state dropped from consolidated local_sgd checkpoints."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.utilities.exceptions import SIGTERMException

from moe_plugin.lightning.strategies.local_sgd_checkpoint import PREFIX_MOMENTUM, PREFIX_SYNCED, drop_outer_state
from moe_plugin.lightning.strategies.local_sgd_sigterm import HOOK, SigtermHookMissing, scope_sigterm_to_island
from moe_plugin.parallel.islands import IslandMesh


def _mesh() -> IslandMesh:
    """A one-rank island (no process group needed: the flag is its own leader's)."""
    return IslandMesh(
        world_size=1,
        rank=0,
        expert_parallel_size=1,
        expert_group=None,
        expert_data_group=None,
        world_group=None,
        island_index=0,
        islands=[[0]],
        outer_group=None,
    )


def test_the_private_lightning_hook_still_exists() -> None:
    """Fails on a Lightning upgrade that renames it: then local_sgd_sigterm.py needs a new way in."""
    assert callable(getattr(_TrainingEpochLoop, HOOK, None))


def test_scoped_hook_raises_on_the_island_leaders_flag() -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert scope_sigterm_to_island(trainer, _mesh(), "cpu", required=True)
    hook = getattr(trainer.fit_loop.epoch_loop, HOOK)
    assert getattr(type(trainer.fit_loop.epoch_loop), HOOK) is not hook  # this instance only, not the class
    hook()  # no SIGTERM received: returns
    trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets
    with pytest.raises(SIGTERMException):
        hook()


def test_missing_hook_refuses_time_based_rounds_and_warns_for_step_based(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    monkeypatch.delattr(_TrainingEpochLoop, HOOK)
    with pytest.raises(SigtermHookMissing, match="strategy.sync_every_steps"):
        scope_sigterm_to_island(trainer, _mesh(), "cpu", required=True)
    with pytest.warns(UserWarning, match="cannot be scoped to an island"):
        assert not scope_sigterm_to_island(trainer, _mesh(), "cpu", required=False)


def test_drop_outer_state_keeps_the_model_and_the_rest() -> None:
    w = torch.ones(2)
    ckpt = {
        "state_dict": {"model.a": w, PREFIX_SYNCED + "model.a": w, PREFIX_MOMENTUM + "model.a": w},
        "optimizer_states": [{"state": {}}],
        "global_step": 7,
        "local_sgd": {"round": 3},
        "moe_plugin_extra_files": ["island001/meta.pt"],
    }
    out, dropped = drop_outer_state(ckpt)
    assert dropped == 2 and list(out["state_dict"]) == ["model.a"]
    assert out["global_step"] == 7 and out["optimizer_states"] == ckpt["optimizer_states"]
    assert "local_sgd" not in out and "moe_plugin_extra_files" not in out
    assert len(ckpt["state_dict"]) == 3  # the input is not modified
