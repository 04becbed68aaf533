"""deepspeed_ep at ZeRO 1/2/3 vs expert_parallel: per-rank peak memory and step time, 4 gloo processes.

    python bench/deepspeed_ep.py                  # table (each configuration launched with torchrun, in turn)
    python bench/deepspeed_ep.py --json
    python bench/deepspeed_ep.py --steps 3 --configs ds2,ep

Model: the ~100M-parameter MoE of bench/checkpoint.py (MOE_100M: 8 layers, hidden 512, 16 experts of 512,
one shared expert; shared here, not copied), EP=2 on 4 processes (2 replicas of each expert), micro-batch 2 x
seq 128 per rank, AdamW, one thread per process (4 processes on 2 cores), DS_ACCELERATOR=cpu, gloo.

Per configuration, every rank reports:
- peak RSS (ru_maxrss) at the end, and the model's share: parameters + gradients + optimizer state held by
  this rank, counted from the tensors the engine keeps (DeepSpeed's flat fp32 partitions and their Adam
  state, or the module's parameters/grads and torch AdamW state);
- step time: median over the timed steps of the time between on_train_batch_start and on_train_batch_end
  (forward, backward, gradient reduction, optimizer step), slowest rank; the first --warmup steps untimed.
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
    "ds1": {"strategy": "deepspeed_ep", "stage": 1, "label": "deepspeed_ep ZeRO-1"},
    "ds2": {"strategy": "deepspeed_ep", "stage": 2, "label": "deepspeed_ep ZeRO-2"},
    "ds3": {"strategy": "deepspeed_ep", "stage": 3, "label": "deepspeed_ep ZeRO-3"},
}


def _state_bytes(strategy: Any, module: Any) -> int:
    """Bytes of parameters, gradients and optimizer state this rank holds for the model."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
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


def worker(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    import torch
    from checkpoint import MOE_100M  # bench/checkpoint.py: the ~100M MoE the benchmarks share

    import moe_plugin  # noqa: F401  (registers the strategies)
    from moe_plugin.data.datamodule import LMDataModule
    from moe_plugin.lightning.module import MoELanguageModule
    from moe_plugin.models.decoder import MoEDecoderLM

    torch.set_num_threads(1)
    cfg = CONFIGS[args.config]
    rank = int(os.environ["RANK"])
    times: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, *a: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    if cfg["strategy"] == "deepspeed_ep":
        from moe_plugin.lightning.strategies.deepspeed_ep import DeepSpeedExpertParallelStrategy

        strategy: Any = DeepSpeedExpertParallelStrategy(expert_parallel_size=2, stage=cfg["stage"])
    else:
        from moe_plugin.lightning.strategies.expert_parallel import ExpertParallelStrategy

        strategy = ExpertParallelStrategy(expert_parallel_size=2)
    torch.manual_seed(0)
    module = MoELanguageModule(MoEDecoderLM(max_seq_len=args.seq, **MOE_100M), total_steps=100, warmup_steps=1)
    docs = [(f"d{i}", (b"def f(x):\n    return x + %d\n" % i) * 400) for i in range(64)]
    data = LMDataModule(docs, seq_len=args.seq, batch_size=2, val_fraction=0.05)
    trainer = pl.Trainer(
        accelerator="cpu", devices=4, strategy=strategy, max_steps=args.warmup + args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[Timer()], gradient_clip_val=1.0,
        default_root_dir=args.tmp,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    result = {
        "rank": rank,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_state_mb": _state_bytes(trainer.strategy, module) / 2**20,
        "step_s": times[args.warmup :],
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master_port=0",
            str(Path(__file__).resolve()), "--worker", name, "--out", tmp, "--tmp", tmp,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq", str(args.seq),
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(4)]
    steps = [max(r["step_s"][i] for r in ranks) for i in range(args.steps)]
    return {
        "config": name,
        "label": CONFIGS[name]["label"],
        "step_ms": 1000 * statistics.median(steps),
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in ranks),
        "model_state_mb_max": max(r["model_state_mb"] for r in ranks),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="ep,ds1,ds2,ds3", help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = [run_config(name, args) for name in args.configs.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    base = next((r for r in results if r["config"] == "ep"), results[0])
    print(f"~100M MoE (bench/checkpoint.py MOE_100M), 4 gloo processes x 1 thread, EP=2, micro-batch 2 x {args.seq}")
    print(f"{'configuration':42s} {'step ms':>9s} {'x ep':>6s} {'state MB/rank':>14s} {'peak RSS MB/rank':>17s}")
    for r in results:
        print(
            f"{r['label']:42s} {r['step_ms']:9.0f} {r['step_ms'] / base['step_ms']:6.2f} "
            f"{r['model_state_mb_max']:14.0f} {r['peak_rss_mb_max']:17.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
