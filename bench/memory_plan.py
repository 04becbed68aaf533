"""The planner's memory model against reality: predicted vs measured peak memory per rank of a ~100M-parameter
MoE, trained by `python train.py` (what users run) in several layouts on this machine.

    python bench/memory_plan.py                  # every layout main supports, table
    python bench/memory_plan.py --json           # machine-readable
    python bench/memory_plan.py --only ep2       # one layout (names below)

Each layout runs `python train.py` for a few steps with a callback (PeakMemory, below) that measures optimizer
step `--step` (after the first steps, so AdamW's moments exist) on every rank in two ways:
- rss: the process's peak resident memory during that step (VmHWM, reset through /proc/self/clear_refs just
  before it) minus its baseline, the resident memory that is not model state: RSS at `setup` (model built,
  nothing else yet) minus the bytes of the parameters that exist then. glibc's mmap threshold is pinned
  (MALLOC_MMAP_THRESHOLD_) so that every tensor above 128 KiB is its own mapping, returned to the system
  when freed: RSS then follows live tensors. It sees everything a rank holds: DDP's gradient buckets,
  communication buffers, the allocator's slack.
- tensors: the peak of live tensor storages seen by torch's MemTracker (a TorchDispatchMode that follows every
  storage's lifetime, seeded with the parameters, gradients and optimizer state that exist before the step).
  It cannot see memory held outside tensors (DDP's C++ buckets).
The prediction is moe_plugin.parallel.plan.memory() for the same model, layout and precision, planned for CPU
(device_type="cpu": the routed experts' fused SwiGLU node, which grouped_mm_backend=auto takes on CPU, and
torch's AdamW looping over tensors, foreach=False). Target (issue 10): within 15% of the measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

# ~115M parameters: 4 blocks of 16 experts (1024 wide) + a shared expert, hidden 512, GQA 8/4 heads, vocab 4096.
MODEL = [
    "model=ling_tiny",
    "model.vocab_size=4096",
    "model.hidden_size=512",
    "model.num_layers=4",
    "model.num_heads=8",
    "model.num_kv_heads=4",
    "model.head_dim=64",
    "model.moe.num_experts=16",
    "model.moe.top_k=2",
    "model.moe.expert_hidden_size=1024",
    "model.moe.shared_expert_hidden_size=1024",
]
SEQ_LEN = 512


@dataclass(frozen=True)
class Case:
    name: str
    world: int
    ep: int
    shard: int = 1
    checkpointing: str = "none"
    micro_batch: int = 4
    precision: str = "32-true"

    def overrides(self) -> list[str]:
        out = [
            f"data.batch_size={self.micro_batch}",
            f"trainer.devices={self.world}",
            f"trainer.precision={self.precision}",
        ]
        if self.world > 1:
            out += ["strategy=expert_parallel", f"strategy.expert_parallel_size={self.ep}"]
            if self.shard > 1:
                out.append(f"strategy.data_parallel_shard_size={self.shard}")
        if self.checkpointing != "none":
            out.append(f"model.activation_checkpointing={self.checkpointing}")
        if self.checkpointing == "selective":  # the planner's selective: recompute the routed experts only
            out.append("model.activation_checkpointing_target=experts")
        return out


CASES = [
    Case("single", 1, 1),
    Case("single_mb8", 1, 1, micro_batch=8),
    Case("single_bf16", 1, 1, precision="bf16-mixed"),
    Case("ddp2", 2, 1),
    Case("ep2", 2, 2),
    # need strategy.data_parallel_shard_size and model.activation_checkpointing (the sharded strategy)
    Case("single_full", 1, 1, checkpointing="full"),
    Case("single_selective", 1, 1, checkpointing="selective"),
    Case("ep2_shard2", 4, 2, shard=2),
    Case("ep2_shard2_full", 4, 2, shard=2, checkpointing="full"),
]


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _tensor_bytes(tensors: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


class PeakMemory(pl.Callback):
    """Measure one optimizer step's peak memory on every rank (see the module docstring); write JSON."""

    def __init__(self, out_dir: str, step: int = 3) -> None:
        self.out_dir = Path(out_dir)
        self.step = step
        self._tracker: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        params = _tensor_bytes(pl_module.parameters())
        self.baseline = _status_kib("VmRSS") * 1024 - params

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step != self.step:
            return
        from torch.distributed._tools.mem_tracker import MemTracker

        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self._tracker = MemTracker()
        self._tracker.track_external(pl_module, *trainer.optimizers)
        self._tracker.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: Any, b: Any, i: int) -> None:
        if self._tracker is None:
            return
        self._tracker.__exit__(None, None, None)
        hwm = _status_kib("VmHWM") * 1024
        peak = self._tracker.get_tracker_snapshot("peak")
        tracked = sum(d.get("Total", 0) for d in peak.values())
        by_kind = {str(k).split(".")[-1]: v for d in peak.values() for k, v in d.items() if k != "Total"}
        self._tracker = None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        result = {"rank": trainer.global_rank, "rss_peak": hwm - self.baseline, "tensors_peak": tracked}
        result["tensors_by_kind"] = by_kind
        result["baseline"] = self.baseline
        (self.out_dir / f"memory_rank{trainer.global_rank}.json").write_text(json.dumps(result))


def run_case(case: Case, out: Path, step: int, timeout: float) -> list[dict[str, Any]]:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *MODEL,
        *case.overrides(),
        f"data.seq_len={SEQ_LEN}",
        f"trainer.max_steps={step + 1}",
        "trainer.limit_val_batches=0",
        "validate_at_end=false",
        "sample_lines=0",  # the end-of-run samples decode bytes: this model's 4096-token vocabulary is wider
        "logger=none",
        "callbacks=none",
        "+callbacks.peak_memory._target_=bench.memory_plan.PeakMemory",
        f"+callbacks.peak_memory.out_dir={out}",
        f"+callbacks.peak_memory.step={step}",
        f"paths.output_dir={out}/run",
        f"hydra.run.dir={out}/run",
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{case.name}: train.py failed\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("memory_rank*.json"))]


def predict(case: Case) -> dict[str, Any]:
    from moe_plugin.cli.inspect import build_meta_model
    from moe_plugin.parallel.plan import Layout, get_precision, memory, model_shape

    name, model, seq_len = build_meta_model(MODEL, SEQ_LEN)
    shape = model_shape(model, seq_len, name)
    layout = Layout(case.world, case.ep, case.shard, case.checkpointing, case.micro_batch)
    # a CPU plan: the experts' fused SwiGLU node (grouped_mm_backend=auto on CPU), AdamW one tensor at a time
    mem = memory(shape, layout, get_precision(case.precision), device_type="cpu")
    return {"peak": mem.peak, "phase": mem.phase, "terms": mem.terms, "params": shape.total_params}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated case names: " + ", ".join(c.name for c in CASES))
    parser.add_argument("--step", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cases = CASES if args.only is None else [c for c in CASES if c.name in args.only.split(",")]
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix=f"memplan_{case.name}_") as tmp:
            t0 = time.perf_counter()
            ranks = run_case(case, Path(tmp), args.step, args.timeout)
            seconds = time.perf_counter() - t0
        pred = predict(case)
        rss = max(r["rss_peak"] for r in ranks)
        tensors = max(r["tensors_peak"] for r in ranks)
        rows.append(
            {
                "case": case.name,
                "layout": f"W{case.world} EP{case.ep} shard{case.shard} ckpt={case.checkpointing} mb={case.micro_batch} "
                f"{case.precision}",
                "predicted_gb": pred["peak"] / 1e9,
                "predicted_phase": pred["phase"],
                "rss_gb": rss / 1e9,
                "tensors_gb": tensors / 1e9,
                "error_vs_rss": pred["peak"] / rss - 1,
                "error_vs_tensors": pred["peak"] / tensors - 1,
                "ranks": ranks,
                "predicted_terms_gb": {k: v / 1e9 for k, v in pred["terms"].items()},
                "seconds": seconds,
            }
        )
        if not args.json:
            r = rows[-1]
            print(
                f"{r['case']:12s} {r['layout']:40s} predicted {r['predicted_gb']:6.3f} GB  rss {r['rss_gb']:6.3f} GB "
                f"({r['error_vs_rss']:+6.1%})  tensors {r['tensors_gb']:6.3f} GB ({r['error_vs_tensors']:+6.1%})",
                flush=True,
            )
    if args.json:
        print(json.dumps({"params": predict(cases[0])["params"], "rows": rows}, indent=2))
    print(
        f"# max RSS of this driver {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB", file=sys.stderr
    )
    return 0 if all(abs(r["error_vs_rss"]) <= 0.15 for r in rows) else 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
