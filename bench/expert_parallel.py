"""Expert-parallel MoE layer: ours (AllToAllDispatcher, dropless) vs DeepSpeed MoE(ep_size=2), 2 gloo processes.

    python bench/expert_parallel.py                 # table
    python bench/expert_parallel.py --json          # machine-readable
    python bench/expert_parallel.py --tokens 1024   # smaller

Each of 2 processes (1 thread each, gloo, DS_ACCELERATOR=cpu) runs forward+backward of one MoE layer on
its own tokens, for every implementation in turn inside the same iteration (interleaved, so machine
load hits all of them alike). Reported per routing:
- step: median over iterations of the SLOWEST rank's forward+backward time (ms);
- exchange: time inside collectives (all_to_all_single, all_reduce) of the rank that waited least (the
  critical path: the others' extra collective time is waiting for it, i.e. load imbalance), and its
  share of the step; compute = step - exchange;
- copies: token copies the busiest rank's experts computed (padding included).
Routing is shared by all implementations (same router weights, deterministic top-2 for DeepSpeed):
- balanced: random router, inputs N(0, 1);
- skewed:   every token's first choice is expert 0 (on rank 0), second choice random.
DeepSpeed modes: "drop" = capacity factor 1.0 (its default; drops copies over capacity),
"dropless" = drop_tokens=False (pads every expert to the busiest one).
Targets (issue 4): balanced ours <= DS drop; skewed ours <= 0.5 x DS dropless; exchange <= 1/3 of step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_COLLECTIVE_SECONDS = [0.0]


def _timed(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _COLLECTIVE_SECONDS[0] += time.perf_counter() - t0

    return wrapper


def _router_weight(E: int, D: int, skewed: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(E, D, generator=g) * 0.02
    if skewed:
        w[0] += 0.5  # inputs have a positive mean: expert 0 is every token's first choice
    return w


def _inputs(rank: int, T: int, D: int, skewed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, D, generator=g) + (0.5 if skewed else 0.0)
    return x, torch.randn(T, D, generator=g)


def _ours(args: argparse.Namespace, skewed: bool) -> tuple[nn.Module, Callable[[], int]]:
    from moe_plugin.layers.moe import MoE
    from moe_plugin.parallel.apply import apply_expert_parallel
    from moe_plugin.parallel.mesh import build_expert_parallel_mesh

    torch.manual_seed(0)
    layer = MoE(
        args.hidden,
        args.experts,
        args.top_k,
        args.ffn,
        aux_loss_coef=0.01,
        z_loss_coef=1e-4,
        grouped_mm_backend=args.grouped_mm_backend,
    )
    with torch.no_grad():
        layer.router.weight.copy_(_router_weight(args.experts, args.hidden, skewed))
    apply_expert_parallel(layer, build_expert_parallel_mesh(2))
    original = layer.experts.forward

    def counting_forward(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        layer._bench_copies = int(x.shape[0])  # type: ignore[attr-defined]
        return original(x, counts)

    layer.experts.forward = counting_forward  # type: ignore[method-assign]
    return layer, lambda: int(getattr(layer, "_bench_copies", 0))


def _deepspeed(args: argparse.Namespace, skewed: bool, drop: bool) -> tuple[nn.Module, Callable[[], int]]:
    from deepspeed.moe.layer import MoE as DSMoE

    from moe_plugin.layers.feed_forward import FeedForward

    torch.manual_seed(0)
    layer = DSMoE(
        args.hidden,
        FeedForward(args.hidden, args.ffn),  # one expert: the same SwiGLU math as GroupedExperts
        num_experts=args.experts,
        ep_size=2,
        k=args.top_k,
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        min_capacity=0,
        drop_tokens=drop,
        use_rts=False,
        top2_2nd_expert_sampling=False,  # deterministic second choice: the same routing as ours
    )
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(_router_weight(args.experts, args.hidden, skewed))
    experts = layer.deepspeed_moe.experts
    original = experts.forward

    def counting_forward(x: torch.Tensor) -> torch.Tensor:
        experts._bench_copies = int(x.shape[0] * x.shape[1] * x.shape[2])  # type: ignore[attr-defined]
        return original(x)

    experts.forward = counting_forward  # type: ignore[method-assign]
    return layer, lambda: int(getattr(experts, "_bench_copies", 0))


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    layer.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    _COLLECTIVE_SECONDS[0] = 0.0
    t0 = time.perf_counter()
    out = layer(xr)
    y = out[0] if isinstance(out, tuple) else out
    (y * g).sum().backward()
    return time.perf_counter() - t0, _COLLECTIVE_SECONDS[0]


def _worker(rank: int, args: argparse.Namespace, port: int, queue: Any) -> None:
    torch.set_num_threads(1)
    if args.host_allocator == "tuned":  # what train.py's processes do (kernels/host_allocator.py)
        from moe_plugin.kernels.host_allocator import keep_freed_host_memory

        keep_freed_host_memory()
    if args.json:  # DeepSpeed prints to stdout; keep stdout for the JSON document
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"})
    os.environ.update({"LOCAL_RANK": str(rank), "LOCAL_SIZE": "2", "DS_ACCELERATOR": "cpu"})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    impls: dict[str, Callable[[bool], tuple[nn.Module, Callable[[], int]]]] = {
        "ours (dropless)": lambda s: _ours(args, s)
    }
    if not args.no_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        impls["DeepSpeed drop (cf 1.0)"] = lambda s: _deepspeed(args, s, drop=True)
        impls["DeepSpeed dropless"] = lambda s: _deepspeed(args, s, drop=False)
    dist.all_to_all_single = _timed(dist.all_to_all_single)  # type: ignore[assignment]
    dist.all_reduce = _timed(dist.all_reduce)  # type: ignore[assignment]

    results = []
    for routing in ("balanced", "skewed"):
        skewed = routing == "skewed"
        layers = {name: make(skewed) for name, make in impls.items()}
        x, g = _inputs(rank, args.tokens, args.hidden, skewed)
        samples: dict[str, list[tuple[float, float, float, int]]] = {n: [] for n in layers}
        for it in range(args.warmup + args.iters):
            for name, (layer, copies) in layers.items():
                dist.barrier()
                step, exchange = _step(layer, x, g)
                stats = torch.tensor([step, exchange, float(copies())], dtype=torch.float64)
                gathered = [torch.zeros_like(stats) for _ in range(2)]
                dist.all_gather(gathered, stats)
                # step: the slowest rank's. exchange: the time in collectives of the rank that waited least
                # (the critical path); the other ranks' extra time in collectives is waiting for it
                # (load imbalance), which shows up in the step time, not as exchange cost.
                step = max(t[0].item() for t in gathered)
                exchange = min(t[1].item() for t in gathered)
                busiest = max(t[2].item() for t in gathered)
                if it >= args.warmup:
                    samples[name].append((step, exchange, busiest, int(busiest)))
        for name, rows in samples.items():
            step = statistics.median(r[0] for r in rows) * 1e3
            exchange = statistics.median(r[1] for r in rows) * 1e3
            results.append(
                {
                    "routing": routing,
                    "impl": name,
                    "step_ms": round(step, 2),
                    "exchange_ms": round(exchange, 2),
                    "compute_ms": round(step - exchange, 2),
                    "exchange_share": round(exchange / step, 3),
                    "busiest_rank_copies": rows[-1][3],
                }
            )
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def _ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    by = {(r["routing"], r["impl"]): r for r in results}
    out = {}
    ours_b, ours_s = by.get(("balanced", "ours (dropless)")), by.get(("skewed", "ours (dropless)"))
    if ("balanced", "DeepSpeed drop (cf 1.0)") in by and ours_b:
        out["balanced: ours / DS drop (target <= 1.0)"] = round(
            ours_b["step_ms"] / by[("balanced", "DeepSpeed drop (cf 1.0)")]["step_ms"], 3
        )
    if ("skewed", "DeepSpeed dropless") in by and ours_s:
        out["skewed: ours / DS dropless (target <= 0.5)"] = round(
            ours_s["step_ms"] / by[("skewed", "DeepSpeed dropless")]["step_ms"], 3
        )
    for routing, r in (("balanced", ours_b), ("skewed", ours_s)):
        if r:
            out[f"{routing}: ours exchange share (target <= 0.333)"] = r["exchange_share"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="expert FFN width")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--grouped-mm-backend", default="auto", help="model.moe.grouped_mm_backend for ours")
    p.add_argument("--no-deepspeed", action="store_true", help="time ours only")
    p.add_argument(
        "--host-allocator",
        choices=("default", "tuned"),
        default="default",
        help="tuned: each process keeps freed memory mapped as train.py does (kernels/host_allocator.py)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ["DS_ACCELERATOR"] = "cpu"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args, port, queue), nprocs=2, start_method="spawn", join=True)
    results = queue.get()
    ratios = _ratios(results)
    if args.json:
        print(json.dumps({"config": vars(args), "results": results, "ratios": ratios}, indent=2))
        return 0
    print(
        f"MoE layer fwd+bwd, 2 gloo processes x 1 thread, {args.tokens} tokens/rank, D={args.hidden}, "
        f"F={args.ffn}, E={args.experts}, top-{args.top_k}, EP=2 (median of {args.iters}, slowest rank)"
    )
    print("| routing | implementation | step ms | exchange ms | compute ms | exchange share | busiest rank's copies |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['routing']} | {r['impl']} | {r['step_ms']:.1f} | {r['exchange_ms']:.1f} | {r['compute_ms']:.1f} | "
            f"{r['exchange_share']:.2f} | {r['busiest_rank_copies']} |"
        )
    for k, v in ratios.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
