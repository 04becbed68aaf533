"""SIGTERM with 2 processes under expert_parallel (Lightning's launcher starts rank 1), through `python train.py`.

The fault injector sends SIGTERM to rank 0 at the start of step 7; Lightning's launcher forwards it to rank 1,
which receives it wherever it is. Lightning's own handler ran a broadcast inside the signal handler, so the ranks
issued different collectives (reproduced: gloo "Timed out waiting 60000ms for recv" in that broadcast on one rank
while the other was in the MoE all-to-all, no checkpoint). With lightning/sigterm.py the handler only records
the signal and the ranks agree at the step boundary: both save preempted-step000008.ckpt and exit 143, and
resume=auto reproduces the uninterrupted curve. A SIGTERM sent from outside to rank 1 only, while validation
(after every step) takes most of the time, stops both ranks at the same validation batch. (deepspeed_ep with a
SIGTERM to rank 1 only: tests/distributed/test_deepspeed_ep.py.)
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
from train_runs import HERE, ROOT, STEPS, ok, same_curve, train

from moe_plugin.lightning.checkpoint_io import check_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(600)]

SIGTERM_RANK0 = (
    "callbacks=[default,fault_injection]",
    "+callbacks.fault_injection.faults=[{kind: sigterm, step: 7, rank: 0}]",
)


def test_sigterm_forwarded_by_lightnings_launcher_stops_both_ranks_at_one_step(tmp_path: Path) -> None:
    ref = ok(train(tmp_path, "ref", 1, None))
    first = train(tmp_path, "ep2", 2, 2, extra=SIGTERM_RANK0)
    assert first.returncode == 143, first.output[-3000:]
    logs = first.rank_logs()
    assert len(logs) == 2 and all("exits with status 143" in log for log in logs), first.output[-3000:]
    assert "received SIGTERM" in logs[1]  # forwarded by rank 0's launcher
    saved = first.out_dir / "checkpoints" / "preempted-step000008.ckpt"
    assert check_checkpoint(saved).valid, check_checkpoint(saved).reason
    assert sorted(first.curve()) == list(range(1, 9))
    again = ok(train(tmp_path, "ep2", 2, 2, extra=SIGTERM_RANK0))  # resume=auto (default)
    assert "resuming from" in again.output and "preempted-step000008" in again.output
    same_curve(again, ref, range(1, STEPS + 1))


def _train_children(pid: int) -> list[int]:
    """train.py processes whose parent is `pid` (Lightning's launcher starts rank 1 as a child of rank 0)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"train.py" in cmdline:
            out.append(int(stat.parent.name))
    return out


def test_sigterm_to_rank1_during_validation_stops_both_ranks_at_one_batch(tmp_path: Path) -> None:
    """Validation after every step (most of the wall time), SIGTERM from outside to rank 1 only. Lightning checks
    `trainer.received_sigterm` after every validation batch on each rank by itself: a rank that stopped alone would
    leave its peer in the next batch's all-to-all. The ranks agree after each validation batch, so both stop at the
    same check, save one checkpoint together and exit 143."""
    run = tmp_path / "run"
    args = [
        "experiment=tiny_smoke",
        "logger=none",
        "trainer.max_steps=60",
        "trainer.val_check_interval=1",
        "trainer.limit_val_batches=16",
        "trainer.enable_progress_bar=false",
        "validate_at_end=false",
        "data.batch_size=4",
        "trainer.devices=2",
        "strategy=expert_parallel",
        "strategy.expert_parallel_size=2",
        "strategy.timeout_seconds=60",
        "+callbacks.recorder._target_=ep_callbacks.GlobalLossRecorder",
        f"+callbacks.recorder.path={run}/curve.jsonl",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "WANDB_MODE": "disabled"}
    env["OMP_NUM_THREADS"] = "1"
    output = tmp_path / "output.txt"
    with output.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        curve, deadline = run / "curve.jsonl", time.monotonic() + 240
        while not (curve.exists() and curve.read_text().count("\n") >= 3) and time.monotonic() < deadline:
            assert proc.poll() is None, output.read_text()[-3000:]
            time.sleep(0.2)
        (rank1,) = _train_children(proc.pid)  # 3 steps done: training (and validation after each step) under way
        os.kill(rank1, signal.SIGTERM)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = output.read_text()
    assert proc.returncode == 143, out[-3000:]
    logs = [p.read_text() for p in sorted(run.glob("train*.log"))]
    assert len(logs) == 2 and all("exits with status 143" in log for log in logs), out[-3000:]
    saved = sorted((run / "checkpoints").glob("preempted-step*.ckpt"))
    assert len(saved) == 1 and check_checkpoint(saved[0]).valid, out[-3000:]
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    saves = [e for e in events if e["source"] == "preemption"]
    assert [e["step"] for e in saves] == [check_checkpoint(saved[0]).global_step], saves
    print("preemption saved", saves)  # where: "during validation" (usual here) or "step boundary"
