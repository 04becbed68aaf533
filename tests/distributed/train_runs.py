"""Run `python train.py` (what users type) in a subprocess under a timeout and read its per-step global losses.

Multi-process runs are launched by Lightning itself (trainer.devices=N re-runs the script per rank),
never inside the pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
GLOBAL_BATCH = 8
STEPS = 20
SAVE_EVERY = 10


@dataclass
class Run:
    returncode: int
    output: str
    seconds: float
    out_dir: Path

    def rows(self) -> list[dict[str, float]]:
        """One row per training batch (micro-batch), in order."""
        path = self.out_dir / "curve.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def curve(self) -> dict[int, dict[str, float]]:
        """Rows keyed by the optimizer steps completed after the batch (1 micro-batch per step)."""
        return {r["step"]: r for r in self.rows()}

    def checkpoint(self, step: int) -> Path:
        return self.out_dir / "checkpoints" / f"step{step:06d}.ckpt"

    def rank_logs(self) -> list[str]:
        """Each rank's log file, in rank order (Hydra: train.log for rank 0, train_ddp_process_R.log for rank R)."""
        return [p.read_text() for p in sorted(self.out_dir.glob("train*.log"))]


def train(
    tmp: Path,
    name: str,
    world: int,
    ep: int | None,
    ckpt: Path | None = None,
    extra: tuple[str, ...] = (),
    timeout: float = 300,
    batch_size: int | None = None,
    save_every: int = SAVE_EVERY,
    strategy: tuple[str, ...] = (),
) -> Run:
    """ep=None: plain Lightning (strategy=auto, one process); else strategy=expert_parallel with EP=ep.
    `strategy` (overrides such as ("strategy=deepspeed_ep", "strategy.stage=2")) replaces both."""
    out = tmp / name
    overrides = [
        "experiment=tiny_smoke",
        "logger=none",
        # the warmup is layout-exact (test_warmup_exact.py); off here to keep these references warmup-free
        "model.moe.routing_warmup=false",
        f"trainer.max_steps={STEPS}",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "validate_at_end=false",
        f"data.batch_size={batch_size or GLOBAL_BATCH // world}",
        f"callbacks.model_checkpoint.every_n_train_steps={save_every}",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_last=false",
        "+callbacks.recorder._target_=ep_callbacks.GlobalLossRecorder",
        f"+callbacks.recorder.path={out}/curve.jsonl",
        f"hydra.run.dir={out}",
        f"trainer.devices={world}",
    ]
    if strategy:
        overrides += list(strategy)
    elif ep is None:
        overrides.append("strategy=auto")
    else:
        overrides += ["strategy=expert_parallel", f"strategy.expert_parallel_size={ep}", "strategy.timeout_seconds=60"]
    if ckpt is not None:
        overrides.append(f"ckpt_path={ckpt}")
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
            "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
        }
    )
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, *extra]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )
    return Run(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0, out)


ATOL = 1e-5


def ok(run: Run) -> Run:
    """`run`, after asserting it exited 0 (the failure message carries the end of its output)."""
    assert run.returncode == 0, f"run in {run.out_dir} failed ({run.seconds:.0f} s):\n{run.output[-4000:]}"
    return run


def same_curve(run: Run, ref: Run, steps: range, keys: tuple[str, ...] = ("loss",), atol: float = ATOL) -> None:
    """`run` recorded exactly `steps`, each with the same `keys` values as `ref` at that step (within `atol`)."""
    got, want = run.curve(), ref.curve()
    assert sorted(got) == list(steps), f"{run.out_dir.name} recorded steps {sorted(got)}"
    for s in steps:
        for k in keys:
            assert abs(got[s][k] - want[s][k]) <= atol, f"{run.out_dir.name} step {s} {k}: {got[s][k]} vs {want[s][k]}"
