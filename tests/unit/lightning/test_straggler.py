"""Straggler rule (pure) and the monitor in a real single-process run with an injected slow forward."""

from __future__ import annotations

import pytest
import torch

from moe_plugin.lightning.callbacks.fault_injection import FaultInjector
from moe_plugin.lightning.callbacks.straggler import PHASES, StragglerMonitor, analyse
from tests.unit.lightning.tiny import tiny_data, tiny_module, tiny_trainer

torch.set_num_threads(1)


def test_analyse_flags_the_slow_rank_and_its_phase():
    base = [0.01, 0.05, 0.08, 0.02]  # data, forward, backward, optimizer (s)
    rows = [list(base) for _ in range(4)]
    for r in (0, 1, 3):  # synchronous DP: the fast ranks wait for rank 2 inside backward's all-reduce
        rows[r][PHASES.index("backward")] += 0.1
    rows[2][PHASES.index("forward")] += 0.1  # rank 2: slow forward (sync-free: 0.18 s vs 0.08 s)
    rep = analyse(rows, factor=1.3)
    assert max(rep["step_ms"]) - min(rep["step_ms"]) < 1e-9  # step times alone cannot tell
    assert [s["rank"] for s in rep["stragglers"]] == [2]
    assert rep["stragglers"][0]["slow_phase"] == "forward"
    assert rep["slowest_rank"] == 2 and rep["slowest_ratio"] == pytest.approx(0.18 / 0.08)
    assert analyse(rows, factor=3.0)["stragglers"] == []
    assert analyse(rows, factor=1.3, min_excess_ms=200)["stragglers"] == []


def test_bad_options():
    with pytest.raises(ValueError, match="callbacks.straggler.factor=1.0"):
        StragglerMonitor(factor=1.0)
    with pytest.raises(ValueError, match="every_n_steps=0"):
        StragglerMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="sync_free_phases"):
        StragglerMonitor(sync_free_phases=["alltoall"])


@pytest.mark.slow
def test_monitor_times_phases_in_a_run(tmp_path):
    mon = StragglerMonitor(every_n_steps=3)
    slow = FaultInjector([{"kind": "sleep", "step": 0, "until": 100, "seconds": 0.05}])
    trainer = tiny_trainer([mon, slow], 6, tmp_path)
    trainer.fit(tiny_module(), datamodule=tiny_data())
    rep = mon.last_report
    assert rep is not None and rep["step"] == 6 and len(rep["step_ms"]) == 1
    assert rep["stragglers"] == []  # one rank is its own median
    assert rep["step_ms"][0] >= 50.0  # the injected 50 ms sleep before each forward is in the step time
