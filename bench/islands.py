"""Two islands, one slowed 3x: local_sgd (time-based, A-EDiT) against synchronous DDP.

    /work/bin/quiet python bench/islands.py [--budget 60] [--seconds 1.0] [--json out.json]
    /work/bin/quiet python bench/islands.py --reference out.json --variant steps=strategy.weighting=steps

`python train.py` runs on 2 CPU processes (tiny MoE, stdlib corpus, 1 thread per process), each with the SAME
wall-clock training budget (`trainer.max_time`, `--budget` seconds; max_steps is not the limit):

    ddp        strategy=expert_parallel (EP 1: synchronous data parallelism), no slowdown   -- the quality reference
    ddp_slow   the same with rank 1 slowed 3x by the injected delay (callbacks.fault_injection kind=delay)
    local_sgd  strategy=local_sgd, 2 islands of 1 rank, sync every ~`--seconds` s, rank 1 slowed 3x
               (one run per `--variant NAME=override,override...`; default: the shipped defaults)

A callback (ValCurve, below) evaluates the model on global rank 0 on the same fixed held-out windows (the first
`--windows` of the validation split) with the same code: DDP every 10 steps, local_sgd right after every sync
(the synchronised weights, identical on every island), and both once more at the end of training. It records
training wall time without the evaluation time, and the tokens folded into the evaluated weights (DDP: steps x
2 ranks; local_sgd: the local steps of both islands merged so far).

Printed, for each local_sgd variant:
  (a) target = the validation loss ddp_slow reaches within the budget (its final one); seconds to reach it for
      ddp_slow and local_sgd (linear between evaluations) and their ratio (issue 14 target: >= 1.5x);
  (b) validation loss at equal tokens against ddp (no slowdown), at the largest token count both curves cover
      (issue 14 target: within 3%).
`--reference prev.json` reuses ddp and ddp_slow from an earlier run (same budget), so one quiet slot can test
more variants.
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

    def __init__(self, path: str, every_n_steps: int = 10, windows: int = 256) -> None:
        self.path, self.every, self.windows = Path(path), every_n_steps, windows
        self._last = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0, self._eval_s = time.perf_counter(), 0.0
        val = trainer.datamodule.val_set  # type: ignore[attr-defined]
        self._batch = torch.stack([val[i] for i in range(min(self.windows, len(val)))])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._tokens_per_step = batch.shape[0] * (batch.shape[1] - 1)
        self._evaluate(trainer, pl_module, final=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module, final=True)  # local_sgd: after the last sync (the synchronised weights)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool) -> None:
        if not trainer.is_global_zero:
            return
        strategy = trainer.strategy
        if hasattr(strategy, "synced_island_steps"):  # local_sgd: after each sync, the synchronised weights
            mark, steps = strategy._round, strategy.synced_island_steps  # type: ignore[attr-defined]
        else:
            every = trainer.global_step % self.every == 0 or final
            mark = trainer.global_step if every else self._last
            steps = trainer.global_step * trainer.world_size
        if mark == self._last:
            return
        self._last = mark
        t = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x in self._batch.split(64):
                x = x.to(pl_module.device)
                logits = pl_module(x[:, :-1])
                total += F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum"
                ).item()
                count += x[:, 1:].numel()
        pl_module.train(was_training)
        row = {
            "seconds": t - self._t0 - self._eval_s,
            "step": trainer.global_step,
            "tokens": steps * self._tokens_per_step,
            "val": total / count,
        }
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
    syncs = [e for e in syncs if e.get("event") == "sync"]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "rows": rows,
        "wall": wall,
        "train_seconds": summary["train_seconds"],
        "steps": summary.get("steps"),
        "syncs": [{k: e[k] for k in ("steps", "seconds", "norms", "scored", "weights") if k in e} for e in syncs],
    }


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
    if rows and rows[-1]["tokens"] == tokens:
        return rows[-1]["val"]
    raise ValueError(f"{tokens} tokens is outside the curve ({rows[0]['tokens']}..{rows[-1]['tokens']})")


def compare(ref: dict[str, Any], slow: dict[str, Any], lsgd: dict[str, Any]) -> dict[str, Any]:
    """Targets (a) and (b) of the module docstring for one local_sgd run."""
    target = slow["rows"][-1]["val"]
    t_slow, t_lsgd = time_to(slow["rows"], target), time_to(lsgd["rows"], target)
    tokens = min(ref["rows"][-1]["tokens"], lsgd["rows"][-1]["tokens"])
    ref_val, lsgd_val = val_at_tokens(ref["rows"], tokens), val_at_tokens(lsgd["rows"], tokens)
    steps = [s["steps"] for s in lsgd["syncs"]]
    weights = [s["weights"] for s in lsgd["syncs"]]
    return {
        "target_val_loss": round(target, 4),
        "seconds_to_target": {"ddp": time_to(ref["rows"], target), "ddp_slow": t_slow, "local_sgd": t_lsgd},
        "speedup_vs_ddp_slow": (t_slow / t_lsgd) if t_slow and t_lsgd else None,
        "equal_tokens": tokens,
        "val_at_equal_tokens": {"ddp": round(ref_val, 4), "local_sgd": round(lsgd_val, 4)},
        "val_gap_vs_ddp": lsgd_val / ref_val - 1.0,
        "final": {"local_sgd": lsgd["rows"][-1], "ddp_slow": slow["rows"][-1], "ddp": ref["rows"][-1]},
        "rounds": len(steps),
        "island_steps": [sum(s[i] for s in steps) for i in range(2)] if steps else None,
        "mean_weight_fast_island": sum(w[0] for w in weights) / len(weights) if weights else None,
        "steps_per_round_first_last": [steps[:3], steps[-3:]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds of every run (trainer.max_time)")
    parser.add_argument("--seconds", type=float, default=1.0, help="strategy.sync_every_seconds of local_sgd")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--json", help="also write the results (with the curves) here")
    parser.add_argument("--reference", help="reuse ddp and ddp_slow from this earlier --json output")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=override,override...: a local_sgd run with these extra overrides (repeatable); "
        "default: one run 'local_sgd' with the shipped defaults",
    )
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) or {"local_sgd": ""}
    load_before = os.getloadavg()
    budget = [f"+trainer.max_time={{seconds: {args.budget}}}", "trainer.max_steps=100000"]
    ep = ["strategy=expert_parallel", "strategy.reduce_router_counts=false", *budget]
    lsgd = [
        "strategy=local_sgd",
        "strategy.island_size=1",
        "strategy.sync_every_steps=null",
        f"strategy.sync_every_seconds={args.seconds}",
        "strategy.sync_min_steps=4",
        "strategy.reduce_router_counts=false",
        *budget,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if args.reference:
            r = {k: v for k, v in json.loads(Path(args.reference).read_text())["runs"].items() if k.startswith("ddp")}
        else:
            r = {
                "ddp": run("ddp", Path(tmp), [*ep, "+callbacks.fault_injection.faults=[]"], args.threads),
                "ddp_slow": run("ddp_slow", Path(tmp), [*ep, SLOW], args.threads),
            }
        for name, extra in variants.items():
            if args.json:  # what finished so far, in case a later run fails
                Path(args.json).write_text(json.dumps({"runs": r}))
            r[name] = run(name, Path(tmp), [*lsgd, *[o for o in extra.split(",") if o], SLOW], args.threads)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "threads_per_process": args.threads,
        "budget_seconds": args.budget,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "variants": {k: v for k, v in variants.items()},
        "compare": {name: compare(r["ddp"], r["ddp_slow"], r[name]) for name in variants},
        "train_seconds": {k: v["train_seconds"] for k, v in r.items()},
        "optimizer_steps": {k: v.get("steps") for k, v in r.items()},
        "process_wall_seconds": {k: round(v["wall"], 1) for k, v in r.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "runs": r}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
