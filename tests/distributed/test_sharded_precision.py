"""FSDP2's mixed precision and CPU offload policies, driven by the strategy's keys, through `python train.py`.

Three runs of the same 20 steps, (EP 1 x shard 2) on 2 processes so that the experts are sharded too
(ES = 2), each with tests/distributed/sharding_probe.py recording what FSDP2 did on rank 0:
- F32: trainer.precision=32;
- B16: trainer.precision=bf16-mixed: parameters all-gathered in bf16 for compute (dense linear and routed
  experts), fp32 sharded master weights, fp32 gradients (reduce dtype) and fp32 Adam moments; it trains
  (loss falls) and stays close to F32 (bf16 rounding: 2% per step, loosely, not an exactness claim);
- OFF: strategy.offload_optimizer=true: every FSDP module carries CPUOffloadPolicy, and the losses equal F32
  (on this CPU-only machine the offload moves nothing, so only the policy and the unchanged results can be
  checked; the host-device copies of a GPU run are not exercised here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_runs import STEPS, Run, ok, same_curve, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(600)]


def _run(tmp: Path, name: str, *extra: str) -> tuple[Run, dict]:
    probe = tmp / f"{name}_probe.json"
    run = ok(
        train(
            tmp,
            name,
            2,
            1,
            extra=(
                "strategy.data_parallel_shard_size=2",
                "+callbacks.probe._target_=sharding_probe.ShardingProbe",
                f"+callbacks.probe.path={probe}",
                *extra,
            ),
            save_every=STEPS,
        )
    )
    return run, json.loads(probe.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, dict]]:
    tmp = tmp_path_factory.mktemp("sharded_precision")
    return {
        "F32": _run(tmp, "F32", "trainer.precision=32"),
        "B16": _run(tmp, "B16", "trainer.precision=bf16-mixed"),
        "OFF": _run(tmp, "OFF", "trainer.precision=32", "strategy.offload_optimizer=true"),
    }


def test_fp32_policy(runs: dict) -> None:
    _, probe = runs["F32"]
    assert probe["params_sharded"] and probe["grad_sharded"]
    assert probe["compute_sharded"] == [False]  # the weights were all-gathered for the forward
    assert probe["param_dtypes"] == probe["compute_dtypes"] == probe["grad_dtypes"] == ["torch.float32"]
    assert probe["policies"] == [["OffloadPolicy", "None", "None"]]


def test_bf16_mixed_policy(runs: dict) -> None:
    run, probe = runs["B16"]
    assert probe["compute_sharded"] == [False]
    assert probe["compute_dtypes"] == ["torch.bfloat16"]  # dense linear and experts computed in bf16
    assert probe["param_dtypes"] == ["torch.float32"]  # fp32 sharded master weights
    assert probe["grad_dtypes"] == ["torch.float32"] and probe["grad_sharded"]  # reduced in fp32
    assert probe["optim_dtypes"] == ["torch.float32"]
    assert probe["policies"] == [["OffloadPolicy", "torch.bfloat16", "torch.float32"]]
    got, want = run.curve(), runs["F32"][0].curve()
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS]["loss"] < got[1]["loss"] - 0.5  # it trains
    for s in got:
        assert abs(got[s]["loss"] - want[s]["loss"]) <= 0.02 * want[s]["loss"], (s, got[s], want[s])


def test_offload_optimizer(runs: dict) -> None:
    run, probe = runs["OFF"]
    assert probe["policies"] == [["CPUOffloadPolicy", "None", "None"]]
    assert probe["devices"] == ["cpu"] and probe["param_dtypes"] == ["torch.float32"]
    same_curve(run, runs["F32"][0], range(1, STEPS + 1), ("loss", "balance", "z"), atol=1e-6)
