"""Fault-injection tests end to end: `python train.py` (and torchrun) in subprocesses, faults from the config.

- SIGTERM (preemption) saves a checkpoint at the step boundary, exits 143, and the next start resumes from it
- a process killed mid-training (1 process; 2 processes with Lightning DDP) and restarted with resume=auto
  reaches the same losses as an uninterrupted run; with the newest checkpoints truncated on disk, they are
  reported, skipped and the previous one is used (still the same final loss)
- torchrun --max-restarts=1: a killed worker is restarted by the elastic agent and the run resumes by itself
- a straggler (sleep injected on rank 1) is flagged in events.jsonl with its slow phase

Every run is a few seconds of a tiny model; each subprocess has a timeout. Never Lightning ddp inside pytest.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_plugin.lightning.checkpoint_io import check_checkpoint, find_latest_valid, list_checkpoints

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "experiment=tiny_smoke",
    "model.num_layers=1",
    "data.seq_len=32",
    "data.source.max_bytes=400000",
    "trainer.max_steps=10",
    "trainer.val_check_interval=1000",
    "trainer.limit_val_batches=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.straggler.every_n_steps=2",
    "callbacks=[default,fault_injection]",
]
# expert_load is off in the multi-process runs: on main (8712c88) ExpertLoad._folder reads trainer.log_dir, a
# collective broadcast, inside a rank-0-only branch of on_train_end, which hangs every DDP run at the end.
DDP = ["trainer.devices=2", "strategy=ddp", "callbacks.expert_load=null"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), WANDB_MODE="offline", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def _faults(*faults: str) -> str:
    return "+callbacks.fault_injection.faults=[" + ",".join(faults) + "]"


def train(
    run_dir: Path, *overrides: str, launcher: list[str] | None = None, timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(ROOT / "train.py"), *TINY, *overrides]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    return subprocess.run(
        cmd, cwd=cwd or ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss per step over every CSV logger version of a run folder (a resumed run adds a version)."""
    out: dict[int, float] = {}
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.fixture(scope="module")
def single_ref(tmp_path_factory) -> Path:
    """An uninterrupted single-process run: the losses every interrupted run must reproduce."""
    ref = tmp_path_factory.mktemp("single") / "ref"
    _ok(train(ref))
    return ref


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_single_process_resumes_to_the_same_loss_skipping_truncated_checkpoints(single_ref, tmp_path):
    ref = single_ref
    run = tmp_path / "run"
    p = train(run, _faults("{kind: kill, step: 7}"))
    assert p.returncode == -9, p.stderr[-2000:]  # SIGKILL: nothing was flushed by Lightning
    assert not (run / "summary.json").exists()
    # truncate every checkpoint of the newest saved step: resume must report them and take the one before
    ckpts = list_checkpoints(run / "checkpoints")
    steps = {c: check_checkpoint(c).global_step for c in ckpts}
    newest = max(s for s in steps.values() if s is not None)
    for c, s in steps.items():
        if s == newest:
            c.write_bytes(c.read_bytes()[:1000])
    p = train(run, _faults("{kind: kill, step: 7}"))
    _ok(p)
    out = p.stdout + p.stderr
    assert "skipping checkpoint" in out and "truncated" in out
    resumed = Path(out.split("resuming from ", 1)[1].splitlines()[0].strip())
    # the previous valid one: judged by the steps recorded before the restart, because when it is last.ckpt
    # the resumed run has overwritten it by now
    steps_before = {str(Path(c).resolve()): s for c, s in steps.items()}
    assert steps_before[str(resumed.resolve())] < newest
    ref_l, run_l = losses(ref), losses(run)
    assert sorted(run_l) == sorted(ref_l) == list(range(10))
    assert run_l == ref_l  # bit-exact per step, replayed steps included
    assert summary(run)["val_loss"] == summary(ref)["val_loss"]
    assert summary(run)["steps"] == 10


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_resume_continues_from_it(single_ref, tmp_path):
    run = tmp_path / "run"
    p = train(run, _faults("{kind: sigterm, step: 7}"))
    assert p.returncode == 143, p.stderr[-2000:]  # 128 + SIGTERM: "terminated", not "finished"
    saved = run / "checkpoints" / "preempted-step000008.ckpt"
    assert check_checkpoint(saved).valid  # step 7 finished, then the state was saved and flushed
    target = find_latest_valid(run / "checkpoints")
    assert check_checkpoint(target).global_step == 8  # the preemption checkpoint (or an equal one of that step)
    p = train(run, _faults("{kind: sigterm, step: 7}"))
    _ok(p)
    assert f"resuming from {target}" in p.stdout + p.stderr
    assert losses(run) == losses(single_ref)
    assert summary(run)["val_loss"] == summary(single_ref)["val_loss"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_two_process_kill_resume_and_torchrun_elastic_restart(tmp_path):
    slow = "{kind: sleep, step: 0, until: 10, rank: 1, seconds: 0.3}"
    ref = tmp_path / "ref"
    _ok(train(ref, *DDP, _faults(slow)))
    # the straggler: rank 1 sleeps before its forward; ranks wait for it inside backward's all-reduce
    events = [json.loads(x) for x in (ref / "events.jsonl").read_text().splitlines()]
    flagged = [e for e in events if e["source"] == "straggler"]
    assert flagged and {e["rank"] for e in flagged} == {1} and {e["slow_phase"] for e in flagged} == {"forward"}
    header = next(csv.reader((ref / "csv" / "version_0" / "metrics.csv").open()))
    assert {"straggler/slowest_ratio", "straggler/rank1_own_ms", "spike/skipped_total", "spike/loss_z"} <= set(header)

    # Lightning DDP launched by train.py: rank 1 killed at step 7, then the same command again
    run = tmp_path / "run"
    p = train(run, *DDP, _faults(slow, "{kind: kill, step: 7, rank: 1}"), timeout=300)
    assert p.returncode != 0
    p = train(run, *DDP, _faults(slow, "{kind: kill, step: 7, rank: 1}"))
    _ok(p)
    assert "resuming from" in p.stdout + p.stderr
    assert losses(run) == losses(ref)
    assert summary(run)["val_loss"] == summary(ref)["val_loss"]

    # torchrun's elastic agent restarts the killed worker group once; the run folder is named by the
    # rendezvous id, so the restarted workers resume by themselves from the same folder. With gloo, the agent's
    # shared TCPStore hands the restarted ranks stale addresses ("Connection refused"): give workers their own
    # store per attempt (documented in docs/reliability.md).
    env = {**_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1"]
    p = subprocess.run(
        [*launcher, str(ROOT / "train.py"), *TINY, *DDP, "task_name=elastic", _faults(slow, "{kind: kill, step: 7, rank: 1}")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    _ok(p)
    (folder,) = (tmp_path / "outputs" / "elastic").glob("torchrun-*")
    assert (folder / "fault_injection_fired.json").exists()  # the kill did happen
    assert len(list((folder / "csv").glob("version_*"))) == 2  # first attempt + restarted attempt
    assert losses(folder) == losses(ref)
    assert summary(folder)["val_loss"] == summary(ref)["val_loss"]
