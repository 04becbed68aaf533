"""`python train.py` with an impossible layout exits at once with the key and the fix (no process waits)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from train_runs import ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(180)]


def test_train_py_rejects_ep_larger_than_world(tmp_path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=tiny_smoke",
        "logger=none",
        "strategy=expert_parallel",
        "strategy.expert_parallel_size=4",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: strategy.expert_parallel_size=4 is larger than the world size 2" in proc.stderr
    assert "Lower strategy.expert_parallel_size to at most 2" in proc.stderr
    assert time.monotonic() - t0 < 150
