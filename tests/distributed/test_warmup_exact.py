"""Ling's Stochastic Routing Warmup is layout-exact, and `train/loss` is the global batch's loss.

`python train.py experiment=tiny_smoke` (model=ling_tiny, routing warmup on for W = 20 steps, so it is active
on every step of these 20-step runs), global batch 8:
- R: one process (strategy=auto);  A: strategy=expert_parallel EP=2 on 2 processes;
- D: A's step-10 checkpoint resumed at EP=4 on 4 processes.
A equals R and D equals A on every step: the global loss (1e-5), the logged `train/loss` (rank 0's value,
which is the mean over ranks) and the warmup's running statistics and step count. Before issue 11 the noise
was drawn per rank from torch's generator (A and D drifted by ~3e-3) and `train/loss` was rank 0's own loss.
"""

from __future__ import annotations

import json

import pytest
from train_runs import STEPS, Run, ok, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]

ATOL = 1e-5
WARMUP = (
    "model.moe.routing_warmup=true",
    f"model.moe.routing_warmup_steps={STEPS}",
    "+callbacks.warmup._target_=ep_callbacks.WarmupRecorder",
)


def _run(tmp, name: str, world: int, ep: int | None, **kw) -> Run:
    out = tmp / name
    run = train(tmp, name, world, ep, extra=(*WARMUP, f"+callbacks.warmup.path={out}/warmup.jsonl"), **kw)
    # the warmup must stay on: train_runs turns it off for the other tests, the later override wins
    return ok(run)


def _warmup_rows(run: Run) -> dict[int, dict]:
    path = run.out_dir / "warmup.jsonl"
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def _same(run: Run, ref: Run, steps: range) -> None:
    got, want = run.curve(), ref.curve()
    gw, ww = _warmup_rows(run), _warmup_rows(ref)
    assert sorted(got) == sorted(gw) == list(steps), f"{run.out_dir.name} recorded steps {sorted(got)}"
    for s in steps:
        assert abs(got[s]["loss"] - want[s]["loss"]) <= ATOL, f"{run.out_dir.name} step {s}: {got[s]} vs {want[s]}"
        # what the loggers see on rank 0 is the global loss, equal to one process's
        assert abs(gw[s]["logged_loss"] - got[s]["loss"]) <= ATOL, (s, gw[s], got[s])
        assert abs(gw[s]["logged_loss"] - ww[s]["logged_loss"]) <= ATOL, (s, gw[s], ww[s])
        assert gw[s]["warmup_step"] == ww[s]["warmup_step"] == s
        for k in ("mean", "std"):
            assert abs(gw[s][k] - ww[s][k]) <= 1e-6 * max(1.0, abs(ww[s][k])), (s, k, gw[s], ww[s])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("warmup_exact")
    return {"tmp": tmp, "R": _run(tmp, "R", 1, None), "A": _run(tmp, "A", 2, 2)}


def test_ep2_with_warmup_equals_one_process(runs: dict) -> None:
    _same(runs["A"], runs["R"], range(1, STEPS + 1))


def test_ep2_resumed_at_ep4_with_warmup_equals_uninterrupted(runs: dict) -> None:
    D = _run(runs["tmp"], "A10_to_ep4", 4, 4, ckpt=runs["A"].checkpoint(10), timeout=420)
    _same(D, runs["A"], range(11, STEPS + 1))
