"""SIGTERM always ends a run with exit 143, a preemption checkpoint and an events line, whatever the validation
cadence. The race this guards: with validation after every step most of the wall time is validation, and
Lightning stops a SIGTERMed run inside its validation loop, after the step-boundary check of the preemption
callback ran, so the run used to exit 0 without a checkpoint (2 of 2 tries with experiment=tiny_smoke).

The signal is a real one sent from outside (as a scheduler does), once training is under way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_plugin.lightning.checkpoint_io import check_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "experiment=tiny_smoke",
    "model.num_layers=1",
    "data.seq_len=32",
    "data.source.max_bytes=400000",
    "trainer.max_steps=60",
    "trainer.val_check_interval=1",  # validation after every step: the SIGTERM lands in it
    "trainer.limit_val_batches=16",
    "validate_at_end=false",
]


def _start(run: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *ARGS, f"hydra.run.dir={run}"],
        cwd=run.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_during_validation_saves_and_exits_143(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(run)
    metrics = run / "csv" / "version_0" / "metrics.csv"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") > 3) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out[-3000:]
    saved = sorted((run / "checkpoints").glob("preempted-step*.ckpt"))
    assert len(saved) == 1 and check_checkpoint(saved[0]).valid, out[-3000:]
    step = check_checkpoint(saved[0]).global_step
    assert 0 < step < 60
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["source"] == "preemption"] == [step]

    proc = _start(run)  # the same command again continues from it and finishes
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming from {saved[0]}" in out
    assert json.loads((run / "summary.json").read_text())["steps"] == 60
