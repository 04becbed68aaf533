"""local_sgd's bad inputs fail before any process starts, naming the key, the value and the fix; the delay fault."""

from __future__ import annotations

import pytest

from moe_plugin.cli.compose import compose_config
from moe_plugin.config.validate import ConfigError, validate_config
from moe_plugin.lightning.callbacks.fault_injection import FaultInjector, _targets
from moe_plugin.lightning.strategies.local_sgd import LocalSGDStrategy


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sync_every_steps": None}, "exactly one of strategy.sync_every_steps"),
        ({"sync_every_seconds": 5.0}, "exactly one of strategy.sync_every_steps"),
        ({"sync_every_steps": 0}, "strategy.sync_every_steps=0 must be >= 1"),
        ({"sync_every_steps": None, "sync_every_seconds": -1.0}, "strategy.sync_every_seconds=-1.0 must be > 0"),
        ({"outer_momentum": 1.0}, "strategy.outer_momentum=1.0"),
        ({"weighting": "mean"}, "strategy.weighting='mean' must be one of"),
        ({"clip_norm": 0.0}, "strategy.clip_norm=0.0"),
        ({"detector_warmup": 0}, "warmup_steps=0"),
        ({"expert_parallel_size": [1, 0]}, r"strategy.expert_parallel_size=\[1, 0\] must be >= 1"),
    ],
)
def test_strategy_arguments_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LocalSGDStrategy(**kwargs)


def test_defaults_are_edit_and_registered() -> None:
    s = LocalSGDStrategy()
    assert (s.outer_lr, s.outer_momentum, s.outer_nesterov, s.weighting, s.temperature) == (
        0.7,
        0.8,
        True,
        "softmax",
        1.0,
    )
    from lightning.pytorch.strategies import StrategyRegistry

    assert "local_sgd" in StrategyRegistry


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["strategy.island_size=3", "trainer.devices=4"], "strategy.island_size=3 must divide the world size 4"),
        (["strategy.island_size=null", "strategy.islands=[[0],[0,1]]", "trainer.devices=2"], "must partition"),
        (["strategy.island_size=1", "strategy.expert_parallel_size=2", "trainer.devices=2"], "island 0"),
        (["strategy.island_size=2", "strategy.expert_parallel_size=[2,1,1]", "trainer.devices=4"], "one per island"),
    ],
)
def test_island_layout_errors_before_launch(overrides: list[str], match: str) -> None:
    cfg = compose_config(["strategy=local_sgd", "logger=none", *overrides])
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


def test_valid_island_layouts() -> None:
    validate_config(compose_config(["strategy=local_sgd", "logger=none", "trainer.devices=2"]))
    validate_config(
        compose_config(
            [
                "strategy=local_sgd",
                "logger=none",
                "trainer.devices=4",
                "strategy.island_size=null",
                "strategy.islands=[[0,1],[2,3]]",
                "strategy.expert_parallel_size=[2,1]",
            ]
        )
    )


def test_delay_fault_arguments() -> None:
    with pytest.raises(ValueError, match=r"faults\[0\].factor=0.5 must be >= 1"):
        FaultInjector([{"kind": "delay", "step": 0, "factor": 0.5}])
    f = FaultInjector([{"kind": "delay", "step": 3, "until": None, "rank": [1, 2]}]).faults[0]
    assert f["until"] == float("inf") and f["factor"] == 3.0
    assert _targets([1, 2], 2) and not _targets([1, 2], 0) and _targets(None, 5) and _targets(0, 0)
