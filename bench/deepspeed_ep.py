"""deepspeed_ep at ZeRO 1/2/3 vs expert_parallel: per-rank peak memory and step time, 4 gloo processes.

    python bench/deepspeed_ep.py                  # table (each configuration launched with torchrun, in turn)
    python bench/deepspeed_ep.py --json
    python bench/deepspeed_ep.py --steps 3 --configs ds2,ep

Model: the ~100M-parameter MoE of bench/checkpoint.py (MOE_100M: 8 layers, hidden 512, 16 experts of 512,
one shared expert; shared here, not copied), EP=2 on 4 processes (2 replicas of each expert), micro-batch 2 x
seq 128 per rank, AdamW, one thread per process (4 processes on 2 cores), DS_ACCELERATOR=cpu, gloo.

Each configuration is `python train.py` with the model overrides, 4 processes launched by Lightning; every
rank reports (a callback added through Hydra):
- peak RSS (ru_maxrss) at the end, and the model's share: parameters + gradients + optimizer state held by
  this rank, counted from the tensors the engine keeps (DeepSpeed's flat fp32 partitions and their Adam
  state, or the module's parameters/grads and torch AdamW state);
- step time: median over the timed steps of the time between on_train_batch_start and on_train_batch_end
  (forward, backward, gradient reduction, optimizer step), slowest rank; the first --warmup steps untimed;
  split into forward (batch start -> on_before_backward), backward (-> on_after_backward: DeepSpeed's ZeRO-2/3
  gradient reduce-scatter runs in backward hooks, DDP's all-reduce too, FSDP2's reduce-scatter per block) and
  the rest (optimizer step: ZeRO-1's gradient reduction, the partitioned Adam step and the all-gather of the
  updated partitions; Lightning's hooks).
Configurations: expert_parallel unsharded and sharded (strategy.data_parallel_shard_size 2 and 4: the dense part,
and at 4 the experts too, sharded with FSDP2), deepspeed_ep ZeRO 1/2/3; all EP=2 on the same 4 processes.
Timings need a quiet machine: run it through /work/bin/quiet and copy the load average it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CONFIGS: dict[str, dict[str, Any]] = {
    "ep": {"strategy": "expert_parallel", "label": "expert_parallel (DDP dense, no sharding)"},
    "eps2": {"strategy": "expert_parallel", "shard": 2, "label": "expert_parallel shard 2 (FSDP2 dense)"},
    "eps4": {"strategy": "expert_parallel", "shard": 4, "label": "expert_parallel shard 4 (+ experts)"},
    "ds1": {"strategy": "deepspeed_ep", "stage": 1, "label": "deepspeed_ep ZeRO-1"},
    "ds2": {"strategy": "deepspeed_ep", "stage": 2, "label": "deepspeed_ep ZeRO-2"},
    "ds3": {"strategy": "deepspeed_ep", "stage": 3, "label": "deepspeed_ep ZeRO-3"},
}


def _state_bytes(strategy: Any, module: Any) -> int:
    """Bytes of parameters, gradients and optimizer state this rank holds for the model."""
    import torch

    seen: set[int] = set()
    total = 0

    from torch.distributed.tensor import DTensor

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, DTensor):  # FSDP2 (expert_parallel with sharding): this rank's shard
            t = t.to_local()
        if torch.is_tensor(t) and t.numel() and id(t.untyped_storage()) not in seen:
            seen.add(id(t.untyped_storage()))
            total += t.untyped_storage().nbytes()

    for p in module.parameters():
        add(p.data)
        add(getattr(p, "ds_tensor", None))
        add(p.grad)
    for opt in strategy.optimizers:
        zero = opt
        base = getattr(zero, "optimizer", zero)
        for group in base.param_groups:
            for p in group["params"]:
                add(p.data)
                add(p.grad)
        for st in base.state.values():
            for v in st.values():
                add(v)
        for name in ("averaged_gradients", "ipg_buffer", "grads_in_partition"):
            value = getattr(zero, name, None)
            for v in value.values() if isinstance(value, dict) else value or []:
                for t in v if isinstance(v, list) else [v]:
                    add(t)
    return total


class StepStats:
    """Lightning callback (added through Hydra): per-step times, then this rank's peak RSS and state bytes."""

    def __new__(cls, path: str, warmup: int) -> Any:
        import lightning.pytorch as pl

        class _StepStats(pl.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []

                self.phases: list[tuple[float, float]] = []

            def on_train_batch_start(self, *a: Any) -> None:
                self.t0 = self.t_fwd = self.t_bwd = time.perf_counter()

            def on_before_backward(self, *a: Any) -> None:
                self.t_fwd = time.perf_counter()

            def on_after_backward(self, *a: Any) -> None:
                self.t_bwd = time.perf_counter()

            def on_train_batch_end(self, *a: Any) -> None:
                self.times.append(time.perf_counter() - self.t0)
                self.phases.append((self.t_fwd - self.t0, self.t_bwd - self.t_fwd))

            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                result = {
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "model_state_mb": _state_bytes(trainer.strategy, pl_module) / 2**20,
                    "step_s": self.times[warmup:],
                    "phases_s": self.phases[warmup:],
                }
                Path(path, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))

        return _StepStats()


def _model_overrides() -> list[str]:
    """MOE_100M of bench/checkpoint.py as Hydra overrides (the benchmarks share one definition)."""
    from checkpoint import MOE_100M

    out = [f"model.{k}={v}" for k, v in MOE_100M.items() if k != "moe"]
    return out + [f"model.moe.{k}={v}" for k, v in MOE_100M["moe"].items()]


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "bench"), env.get("PYTHONPATH", "")])
        strategy = [f"strategy={cfg['strategy']}", "strategy.expert_parallel_size=2", "strategy.timeout_seconds=120"]
        if "stage" in cfg:
            strategy.append(f"strategy.stage={cfg['stage']}")
        if "shard" in cfg:
            strategy.append(f"strategy.data_parallel_shard_size={cfg['shard']}")
        cmd = [
            sys.executable, str(ROOT / "train.py"), *_model_overrides(), *strategy, "trainer.devices=4",
            f"trainer.max_steps={args.warmup + args.steps}", "trainer.limit_val_batches=0", "validate_at_end=false",
            "trainer.enable_progress_bar=false", "logger=none", "callbacks=none", "resume=never",
            f"data.seq_len={args.seq}", "data.batch_size=2", "data.source.max_bytes=2000000",
            "+callbacks.stats._target_=deepspeed_ep.StepStats", f"+callbacks.stats.path={tmp}",
            f"+callbacks.stats.warmup={args.warmup}", f"hydra.run.dir={tmp}/run",
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=tmp)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(4)]
    steps = [max(r["step_s"][i] for r in ranks) for i in range(args.steps)]
    slowest = [max(range(4), key=lambda r, i=i: ranks[r]["step_s"][i]) for i in range(args.steps)]
    fwd = [ranks[r]["phases_s"][i][0] for i, r in enumerate(slowest)]
    bwd = [ranks[r]["phases_s"][i][1] for i, r in enumerate(slowest)]
    return {
        "config": name,
        "label": cfg["label"],
        "step_ms": 1000 * statistics.median(steps),
        "forward_ms": 1000 * statistics.median(fwd),
        "backward_ms": 1000 * statistics.median(bwd),
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in ranks),
        "model_state_mb_max": max(r["model_state_mb"] for r in ranks),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--configs", default="ep,eps2,eps4,ds1,ds2,ds3", help="comma-separated subset of " + ",".join(CONFIGS)
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--timeout", type=float, default=400)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = []
    for name in args.configs.split(","):
        try:
            results.append(run_config(name, args))
        except (RuntimeError, subprocess.TimeoutExpired) as err:  # one broken configuration: report, go on
            print(f"{name}: {err}", file=sys.stderr, flush=True)
            continue
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if not results:
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    base = next((r for r in results if r["config"] == "ep"), results[0])
    print(f"~100M MoE (bench/checkpoint.py MOE_100M), 4 gloo processes x 1 thread, EP=2, micro-batch 2 x {args.seq}")
    print(
        f"{'configuration':42s} {'step ms':>9s} {'x ep':>6s} {'fwd ms':>7s} {'bwd ms':>7s} {'rest ms':>8s} "
        f"{'state MB/rank':>14s} {'peak RSS MB/rank':>17s}"
    )
    for r in results:
        rest = r["step_ms"] - r["forward_ms"] - r["backward_ms"]
        print(
            f"{r['label']:42s} {r['step_ms']:9.0f} {r['step_ms'] / base['step_ms']:6.2f} {r['forward_ms']:7.0f} "
            f"{r['backward_ms']:7.0f} {rest:8.0f} {r['model_state_mb_max']:14.0f} {r['peak_rss_mb_max']:17.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
