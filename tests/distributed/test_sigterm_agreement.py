"""SIGTERM with 2 processes under expert_parallel (Lightning's launcher starts rank 1), through `python train.py`.

The fault injector sends SIGTERM to rank 0 at the start of step 7; Lightning's launcher forwards it to rank 1,
which receives it wherever it is. Lightning's own handler ran a broadcast inside the signal handler, so the ranks
issued different collectives (reproduced: gloo "Timed out waiting 60000ms for recv" in that broadcast on one rank
while the other was in the MoE all-to-all, no checkpoint). With lightning/sigterm.py the handler only records
the signal and the ranks agree at the step boundary: both save preempted-step000008.ckpt and exit 143, and
resume=auto reproduces the uninterrupted curve. (deepspeed_ep with a SIGTERM to rank 1 only:
tests/distributed/test_deepspeed_ep.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from train_runs import STEPS, ok, same_curve, train

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
