"""Layout rules: fail before any process waits, naming the key and the fix."""

from __future__ import annotations

import pytest

from moe_plugin.cli.compose import compose_config
from moe_plugin.config.validate import ConfigError, validate_config
from moe_plugin.parallel.mesh import LayoutError, check_layout, expert_data_group_ranks, expert_group_ranks


def test_group_ranks_are_rows_and_columns_of_the_grid() -> None:
    assert expert_group_ranks(4, 2) == [[0, 1], [2, 3]]
    assert expert_data_group_ranks(4, 2) == [[0, 2], [1, 3]]
    assert expert_group_ranks(4, 4) == [[0, 1, 2, 3]]
    assert expert_data_group_ranks(4, 1) == [[0, 1, 2, 3]]


@pytest.mark.parametrize(
    "world,ep,experts,words",
    [
        (2, 3, [8], ["strategy.expert_parallel_size=3", "larger than the world size 2", "trainer.devices"]),
        (6, 4, [8], ["world size 6", "not divisible", "strategy.expert_parallel_size=4", "[1, 2, 3, 6]"]),
        (4, 4, [6], ["model.moe.num_experts=6", "strategy.expert_parallel_size=4", "[1, 2]"]),
        (2, 0, [8], ["strategy.expert_parallel_size=0", ">= 1"]),
    ],
)
def test_check_layout_errors(world: int, ep: int, experts: list[int], words: list[str]) -> None:
    with pytest.raises(LayoutError) as err:
        check_layout(world, ep, experts)
    for w in words:
        assert w in str(err.value)


def test_good_layouts_pass() -> None:
    check_layout(4, 2, [8, 4])
    check_layout(1, 1, [3])


def _cfg(*overrides: str):
    return compose_config(["experiment=tiny_smoke", "logger=none", "strategy=expert_parallel", *overrides])


@pytest.mark.parametrize(
    "overrides,words",
    [
        (("strategy.expert_parallel_size=4", "trainer.devices=2"), ["strategy.expert_parallel_size=4", "larger"]),
        (("strategy.expert_parallel_size=2", "trainer.devices=3"), ["world size 3", "not divisible"]),
        (("strategy.expert_parallel_size=3", "trainer.devices=3"), ["model.moe.num_experts=8", "not divisible"]),
        (
            ("strategy.expert_parallel_size=2", "trainer.devices=2", "trainer.num_nodes=2", "model.moe.num_experts=6"),
            [],
        ),
    ],
)
def test_validate_config_checks_the_layout(overrides: tuple[str, ...], words: list[str]) -> None:
    cfg = _cfg(*overrides)
    if not words:
        validate_config(cfg)  # 6 experts over EP=2 on 4 ranks is fine
        return
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    for w in words:
        assert w in str(err.value)


def test_sharded_checkpoint_needs_the_expert_parallel_strategy(tmp_path) -> None:
    (tmp_path / "meta.pt").write_bytes(b"")
    cfg = compose_config(["experiment=tiny_smoke", "logger=none", f"ckpt_path={tmp_path}"])
    with pytest.raises(ConfigError, match="moe-plugin ckpt consolidate"):
        validate_config(cfg)


def test_strategy_checks_the_layout_before_creating_the_process_group() -> None:
    """Users who build the Trainer themselves (no validate_config) get the same error, before any rank waits."""
    import lightning.pytorch as pl
    import torch.distributed as dist

    from moe_plugin.lightning.strategies.expert_parallel import ExpertParallelStrategy

    trainer = pl.Trainer(
        strategy=ExpertParallelStrategy(expert_parallel_size=3), devices=2, accelerator="cpu", logger=False
    )
    with pytest.raises(LayoutError, match="strategy.expert_parallel_size=3 is larger than the world size 2"):
        trainer.strategy.setup_environment()
    assert not dist.is_initialized()


def test_strategy_is_registered_by_name() -> None:
    import lightning.pytorch as pl

    import moe_plugin  # noqa: F401
    from moe_plugin.lightning.strategies.expert_parallel import ExpertParallelStrategy

    trainer = pl.Trainer(strategy="expert_parallel", devices=2, accelerator="cpu", logger=False)
    assert isinstance(trainer.strategy, ExpertParallelStrategy)
    assert trainer.strategy.expert_parallel_size == 1


@pytest.mark.parametrize(
    "world,ep,shard,es,words",
    [
        # ES must divide the W / EP = 2 data-parallel replicas of each expert
        (4, 2, 2, 4, ["strategy.expert_shard_size=4", "divide the 2 data-parallel replicas", "[1, 2]"]),
        (8, 1, 2, 3, ["strategy.expert_shard_size=3", "[1, 2, 4, 8]"]),
        (4, 2, 2, 0, ["strategy.expert_shard_size=0", "[1, 2]"]),
        # with the dense part replicated (S = 1) experts are replicated too: only 1
        (4, 2, 1, 2, ["strategy.expert_shard_size=2", "data_parallel_shard_size > 1", "[1]"]),
        (4, 2, 2, "2", ["strategy.expert_shard_size='2'", "[1, 2]"]),
    ],
)
def test_expert_shard_size_errors(world: int, ep: int, shard: int, es: object, words: list[str]) -> None:
    with pytest.raises(LayoutError) as err:
        check_layout(world, ep, [8], shard, expert_shard_size=es)  # type: ignore[arg-type]
    for w in words:
        assert w in str(err.value)


def test_expert_shard_size_rule() -> None:
    from moe_plugin.parallel.mesh import expert_mesh_ranks, resolve_expert_shard_size, valid_expert_shard_sizes

    assert valid_expert_shard_sizes(8, 2, 2) == [1, 2, 4] and valid_expert_shard_sizes(8, 2, 1) == [1]
    assert resolve_expert_shard_size(8, 2, 2) == 4 and resolve_expert_shard_size(8, 2, 1) == 1  # the defaults
    assert resolve_expert_shard_size(8, 2, 2, 1) == 1 and resolve_expert_shard_size(8, 2, 2, 2) == 2
    # [EP, ER, ES]: rank = (er * ES + es) * EP + ep; with ES = 1 every rank of an expert's DP column replicates it
    assert expert_mesh_ranks(4, 2, 2, 1).tolist() == [[[0], [2]], [[1], [3]]]
    assert expert_mesh_ranks(4, 2, 2).tolist() == [[[0, 2]], [[1, 3]]]
    assert expert_mesh_ranks(8, 2, 2, 2).tolist() == [[[0, 2], [4, 6]], [[1, 3], [5, 7]]]
    check_layout(4, 2, [8], 2, expert_shard_size=1)
    check_layout(4, 2, [8], 1, expert_shard_size=1)


def test_validate_config_checks_the_expert_shard_size() -> None:
    cfg = _cfg(
        "strategy.expert_parallel_size=2",
        "trainer.devices=4",
        "strategy.data_parallel_shard_size=2",
        "strategy.expert_shard_size=4",
    )
    with pytest.raises(ConfigError, match=r"strategy.expert_shard_size=4 is not valid here.*Use one of \[1, 2\]"):
        validate_config(cfg)
    validate_config(
        _cfg(
            "strategy.expert_parallel_size=2",
            "trainer.devices=4",
            "strategy.data_parallel_shard_size=2",
            "strategy.expert_shard_size=1",
        )
    )


def test_strategy_checks_the_expert_shard_size_before_creating_the_process_group() -> None:
    import lightning.pytorch as pl
    import torch.distributed as dist

    from moe_plugin.lightning.strategies.expert_parallel import ExpertParallelStrategy

    strategy = ExpertParallelStrategy(expert_parallel_size=1, data_parallel_shard_size=2, expert_shard_size=3)
    trainer = pl.Trainer(strategy=strategy, devices=2, accelerator="cpu", logger=False)
    with pytest.raises(LayoutError, match=r"strategy.expert_shard_size=3 .* Use one of \[1, 2\]"):
        trainer.strategy.setup_environment()
    assert not dist.is_initialized()
