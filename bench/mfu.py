"""Training throughput against the machine's own limit: achieved model FLOP/s / peak fp32 GEMM FLOP/s.

    python bench/mfu.py [--steps 60] [--threads N] [--json out.json] [extra Hydra overrides ...]
    python bench/mfu.py --steady [--warmup 3] [--steps 15] [--threads N] [--cold-cache]

1. Peak: the best fp32 `torch.mm` FLOP/s of this machine at the run's thread count, over square GEMMs
   of 1024, 2048 and 3072 and the run's own dense GEMM shape (tokens x hidden x 4*hidden), best call of
   each over about a second (other processes only ever slow a call down).
2. Achieved: the default `python train.py` (plus your overrides) for `--steps` optimizer steps in a
   subprocess, validation off; tokens/s of its training steps (summary.json, RunSummary) times the model
   FLOPs per token at the run's sequence length (moe_plugin.models.inspect, what `moe-plugin inspect`
   prints):
       F = 6 * activated non-embedding parameters + 12 * layers * heads * head_dim * seq_len
       achieved = tokens/s * F,        ratio = achieved / peak            (target >= 0.8)
3. `--steady`: the same model and batch shape trained in-process in a bare PyTorch loop (AdamW, clipping,
   aux losses; no Lightning, no callbacks, no data loading), eager and with `model.compile=true`'s
   regional compile (parallel/compile.py): the first steps' time (inductor compilation included) and the
   steady-state tokens/s after them. Says how much of the gap is the training glue and whether compiling
   pays, and after how many steps. `--cold-cache` compiles into an empty inductor cache (what the first
   run on a fresh machine pays; otherwise /tmp/torchinductor_<user> may hold the blocks from earlier runs).
Run it through /work/bin/quiet on a shared machine; the load average is printed with the result.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TARGET = 0.8


def gemm_flops(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """Best fp32 FLOP/s of one [m, k] @ [k, n] matmul (preallocated output) over `seconds`."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def measure_peak(tokens: int, hidden: int) -> dict[str, float]:
    shapes = {f"{s}x{s}x{s}": (s, s, s) for s in (1024, 2048, 3072)}
    shapes[f"run {tokens}x{hidden}x{4 * hidden}"] = (tokens, hidden, 4 * hidden)
    return {name: gemm_flops(*mkn) for name, mkn in shapes.items()}


def run_training(steps: int, overrides: list[str], threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            "logger=csv",
            f"paths.output_dir={out}",
            f"trainer.max_steps={steps}",
            "trainer.limit_val_batches=0",
            "validate_at_end=false",
            "resume=never",
            *overrides,
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
            raise SystemExit(proc.returncode)
        return json.loads((out / "summary.json").read_text())


def bare_loop(cfg, compiled: bool, warmup: int, steps: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Train the configured model in a bare loop on random bytes: first `warmup` steps timed together
    (compilation happens there), then `steps` steps timed one by one (median)."""
    import statistics

    from hydra.utils import instantiate

    from moe_plugin.layers.moe import collect_aux_losses
    from moe_plugin.parallel.compile import compile_blocks

    torch.manual_seed(0)
    model = instantiate(cfg.model)
    if compiled:
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, S, V = int(cfg.data.batch_size), int(cfg.data.seq_len), int(cfg.model.vocab_size)
    data = torch.randint(0, V, (B, S + 1))

    def step() -> None:
        out = model(data[:, :-1])
        logits = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), data[:, 1:].reshape(-1))
        aux = collect_aux_losses(model)
        (loss if aux is None else loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"first_steps_seconds": first, "first_steps": warmup, "step_ms": med * 1e3, "tokens_per_second": B * S / med}


def steady(args: argparse.Namespace) -> int:
    from moe_plugin.cli.compose import compose_config
    from moe_plugin.cli.inspect import inspect_model

    cfg = compose_config(args.overrides)
    seq_len = int(cfg.data.seq_len)
    info = inspect_model(args.overrides, seq_len, configured=True)
    peak = max(measure_peak(int(cfg.data.batch_size) * seq_len, int(cfg.model.hidden_size)).values())
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
        "inductor_cache": "cold (empty)" if args.cold_cache else "as found",
        "peak_flops": peak,
    }
    for name, compiled in (("eager", False), ("compiled", True)):
        r = bare_loop(cfg, compiled, args.warmup, args.steps)
        r["ratio"] = r["tokens_per_second"] * info["flops_per_token"] / peak
        result[name] = r
        print(
            f"{name:<9} first {args.warmup} steps {r['first_steps_seconds']:6.1f} s, then {r['step_ms']:7.1f} ms/step "
            f"= {r['tokens_per_second']:,.0f} tokens/s (achieved/peak {r['ratio']:.3f})"
        )
    e, c = result["eager"], result["compiled"]
    extra = c["first_steps_seconds"] - args.warmup * e["step_ms"] / 1e3
    saved = e["step_ms"] / 1e3 - c["step_ms"] / 1e3
    result["compile_speedup_steady"] = e["step_ms"] / c["step_ms"]
    result["break_even_steps"] = args.warmup + extra / saved if saved > 0 else None
    be = f"{result['break_even_steps']:.0f}" if saved > 0 else "never (not faster in steady state)"
    print(f"compiled / eager steady-state speed-up {result['compile_speedup_steady']:.3f}; break-even after {be} steps")
    result["load_average_end"] = os.getloadavg()
    print(
        f"threads {result['threads']}, load average {result['load_average_start']} -> {result['load_average_end']}, "
        f"inductor cache {result['inductor_cache']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps measured (default 60; --steady 15)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--steady", action="store_true", help="bare-loop eager vs compiled steady state (3.)")
    parser.add_argument("--warmup", type=int, default=3, help="--steady: first steps timed together")
    parser.add_argument(
        "--cold-cache", action="store_true", help="compile into an empty inductor cache (a fresh machine's first run)"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for train.py")
    args = parser.parse_args()
    if args.cold_cache:
        # inductor reads the variable whenever it looks for a cached kernel or graph; the training subprocess
        # inherits it. The folder is left behind in /tmp (small) rather than racing a still-running compile worker.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mfu_cold_inductor_")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steady:
        args.steps = args.steps or 15
        return steady(args)
    args.steps = args.steps or 60

    from moe_plugin.cli.compose import compose_config
    from moe_plugin.cli.inspect import inspect_model

    cfg = compose_config(args.overrides)
    seq_len, batch, hidden = int(cfg.data.seq_len), int(cfg.data.batch_size), int(cfg.model.hidden_size)
    info = inspect_model(args.overrides, seq_len, configured=True)
    peaks = measure_peak(batch * seq_len, hidden)
    peak = max(peaks.values())
    summary = run_training(args.steps, args.overrides, args.threads or None)
    achieved = summary["tokens_per_second"] * info["flops_per_token"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "peak_gemm_flops": peaks,
        "peak_flops": peak,
        "seq_len": seq_len,
        "flops_per_token": info["flops_per_token"],
        "attention_flops_per_token": info["attention_flops_per_token"],
        "steps": summary["steps"],
        "tokens_per_second": summary["tokens_per_second"],
        "achieved_flops": achieved,
        "ratio": achieved / peak,
        "target": TARGET,
        "overrides": args.overrides,
        "inductor_cache": "cold (empty)" if args.cold_cache else "as found",
    }
    print(f"threads {result['threads']}, load average {result['load_average']}")
    for name, flops in peaks.items():
        print(f"  peak fp32 GEMM {name:<24}{flops / 1e9:8.1f} GFLOP/s")
    print(
        f"model FLOPs/token {info['flops_per_token'] / 1e6:.2f} M at seq_len {seq_len} "
        f"(attention {info['attention_flops_per_token'] / 1e6:.2f} M)"
    )
    print(f"training steps: {summary['tokens_per_second']:,.0f} tokens/s -> {achieved / 1e9:.1f} GFLOP/s achieved")
    met = "met" if result["ratio"] >= TARGET else "NOT met"
    print(f"achieved / peak = {result['ratio']:.3f}  (target >= {TARGET}) {met}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
