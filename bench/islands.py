"""Two islands, one slowed 3x: local_sgd (time-based, A-EDiT) against synchronous DDP.

    /work/bin/quiet python bench/islands.py [--steps 300] [--seconds 1.0] [--json out.json]

Three `python train.py` runs on 2 CPU processes (tiny MoE, stdlib corpus, 1 thread per process):

    ddp        strategy=expert_parallel (EP 1: synchronous data parallelism), no slowdown   -- the quality reference
    ddp_slow   the same with rank 1 slowed 3x by the injected delay (callbacks.fault_injection kind=delay)
    local_sgd  strategy=local_sgd, 2 islands of 1 rank, sync every ~`--seconds` s, rank 1 slowed 3x

A callback (ValCurve, below) evaluates the model on the same fixed held-out windows on rank 0 (DDP: every 10
steps; local_sgd: after every sync, i.e. the synchronised weights), recording the training wall time without
the evaluation time and the tokens consumed by all ranks. Printed: wall time to reach a validation loss
(the one `ddp` reaches at 60% of its steps) for ddp_slow and local_sgd and their ratio (target >= 1.5x), and
local_sgd's final validation loss against ddp's at the same number of tokens (target within 3%).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "experiment=tiny_smoke",
    "logger=none",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=50",
    "validate_at_end=false",
    "model.moe.routing_warmup=false",
    "data.batch_size=8",
    "optim.schedule=constant",
    "optim.warmup_steps=10",
    "callbacks.model_checkpoint=null",
    "callbacks.expert_load=null",
    "trainer.devices=2",
    "callbacks=[default,fault_injection]",
]
SLOW = "+callbacks.fault_injection.faults=[{kind: delay, step: 0, until: null, rank: 1, factor: 3}]"


class ValCurve(pl.Callback):
    """On global rank 0 only (no collectives): loss on fixed validation windows, with time and tokens."""

    def __init__(self, path: str, every_n_steps: int = 10, windows: int = 32) -> None:
        self.path, self.every, self.windows = Path(path), every_n_steps, windows
        self._last = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0, self._eval_s = time.perf_counter(), 0.0
        val = trainer.datamodule.val_set  # type: ignore[attr-defined]
        self._batch = torch.stack([val[i] for i in range(min(self.windows, len(val)))])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if not trainer.is_global_zero:
            return
        strategy = trainer.strategy
        if hasattr(strategy, "synced_island_steps"):  # local_sgd: after each sync, the synchronised weights
            mark, steps = strategy._round, strategy.synced_island_steps  # type: ignore[attr-defined]
        else:
            mark = trainer.global_step if trainer.global_step % self.every == 0 else self._last
            steps = trainer.global_step * trainer.world_size
        if mark == self._last:
            return
        self._last = mark
        t = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            x = self._batch.to(pl_module.device)
            logits = pl_module(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1)).item()
        pl_module.train(was_training)
        tokens = steps * batch.shape[0] * (batch.shape[1] - 1)
        row = {"seconds": t - self._t0 - self._eval_s, "step": trainer.global_step, "tokens": tokens, "val": loss}
        self._eval_s += time.perf_counter() - t
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run(name: str, tmp: Path, overrides: list[str], threads: int) -> dict[str, Any]:
    out = tmp / name
    curve = out / "curve.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *COMMON,
        f"hydra.run.dir={out}",
        "+callbacks.val_curve._target_=islands.ValCurve",
        f"+callbacks.val_curve.path={curve}",
        *overrides,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")]),
        "OMP_NUM_THREADS": str(threads),
        "WANDB_MODE": "disabled",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in curve.read_text().splitlines()]
    events = out / "events.jsonl"
    syncs = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
    summary = json.loads((out / "summary.json").read_text())
    return {"rows": rows, "wall": wall, "train_seconds": summary["train_seconds"], "syncs": syncs}


def time_to(rows: list[dict[str, float]], target: float) -> float | None:
    """Training seconds at the first evaluation with val <= target (linear between evaluations)."""
    prev = None
    for r in rows:
        if r["val"] <= target:
            if prev is None:
                return r["seconds"]
            f = (prev["val"] - target) / max(prev["val"] - r["val"], 1e-12)
            return prev["seconds"] + f * (r["seconds"] - prev["seconds"])
        prev = r
    return None


def val_at_tokens(rows: list[dict[str, float]], tokens: float) -> float:
    """Validation loss interpolated at `tokens` (rows sorted by tokens)."""
    for a, b in zip(rows, rows[1:]):
        if a["tokens"] <= tokens <= b["tokens"]:
            f = (tokens - a["tokens"]) / max(b["tokens"] - a["tokens"], 1)
            return a["val"] + f * (b["val"] - a["val"])
    raise ValueError(f"{tokens} tokens is outside the reference curve ({rows[0]['tokens']}..{rows[-1]['tokens']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="trainer.max_steps of every run")
    parser.add_argument("--seconds", type=float, default=1.0, help="strategy.sync_every_seconds of local_sgd")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--local-sgd", nargs="*", default=[], help="extra overrides for the local_sgd run")
    args = parser.parse_args()
    load_before = os.getloadavg()
    ep = ["strategy=expert_parallel", "strategy.reduce_router_counts=false", f"trainer.max_steps={args.steps}"]
    lsgd = [
        "strategy=local_sgd",
        "strategy.island_size=1",
        "strategy.sync_every_steps=null",
        f"strategy.sync_every_seconds={args.seconds}",
        "strategy.sync_min_steps=4",
        "strategy.reduce_router_counts=false",
        f"trainer.max_steps={args.steps}",
        *args.local_sgd,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        r = {
            "ddp": run("ddp", Path(tmp), [*ep, "+callbacks.fault_injection.faults=[]"], args.threads),
            "ddp_slow": run("ddp_slow", Path(tmp), [*ep, SLOW], args.threads),
            "local_sgd": run("local_sgd", Path(tmp), [*lsgd, SLOW], args.threads),
        }
    ref = r["ddp"]["rows"]
    target = ref[int(0.6 * (len(ref) - 1))]["val"]
    t_ddp_slow, t_lsgd = time_to(r["ddp_slow"]["rows"], target), time_to(r["local_sgd"]["rows"], target)
    last = r["local_sgd"]["rows"][-1]
    ref_val = val_at_tokens(ref, last["tokens"])
    steps = [s["steps"] for s in r["local_sgd"]["syncs"] if s.get("event") == "sync"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "threads_per_process": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "target_val_loss": target,
        "seconds_to_target": {"ddp": time_to(ref, target), "ddp_slow": t_ddp_slow, "local_sgd": t_lsgd},
        "speedup_vs_ddp_slow": (t_ddp_slow / t_lsgd) if t_ddp_slow and t_lsgd else None,
        "local_sgd_final": last,
        "ddp_val_at_same_tokens": ref_val,
        "val_gap_vs_ddp": last["val"] / ref_val - 1.0,
        "train_seconds": {k: v["train_seconds"] for k, v in r.items()},
        "process_wall_seconds": {k: round(v["wall"], 1) for k, v in r.items()},
        "final_val": {k: v["rows"][-1]["val"] for k, v in r.items()},
        "local_sgd_rounds": len(steps),
        "local_sgd_steps_per_round": steps,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
