"""Benchmark: forward+backward of our MoE layer against the limit and the peers, interleaved in one process.

    python bench/moe_layer.py                 # full table (about 10 minutes on 2 cores)
    python bench/moe_layer.py --json out.json # also write machine-readable results
    python bench/moe_layer.py --quick         # fewer repeats, coarse shape only

Contenders (same tokens, same hidden size; expert weights random, router weights shared so every MoE
sees the same routing):
- ours:            moe_plugin.layers.MoE, dropless, grouped-matmul seam (fused SwiGLU experts node on CPU)
- ours_fused / ours_unfused: the same layer with `fuse_local_routing` forced on / off (permute + experts +
                   combine as one node, kernels/local_moe.py, against the separate permute/experts/combine)
- dense:           a SwiGLU FFN of width K*F: the same activated FLOPs without routing (the practical limit)
- hf_mixtral_*:    transformers' MixtralSparseMoeBlock, experts implementation "eager" and "grouped_mm"
                   (its best CPU backends; "batched_mm" is ~200x slower on CPU and left out)
- hf_qwen3:        transformers' Qwen3MoeSparseMoeBlock, "grouped_mm"
- ds_cap1:         deepspeed.moe.layer.MoE, token dropping with capacity factor 1.0 (computes fewer tokens)
- ds_dropless:     deepspeed.moe.layer.MoE(drop_tokens=False): pads every expert to the busiest one
Routing: "balanced" (a small random router: near-uniform load) and "skewed" (one hot expert that nearly
every token picks as one of its top-k). Time = median of interleaved repeats; peak = peak bytes of live
tensor storages during one forward+backward (tracked with a TorchDispatchMode), parameters excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from moe_plugin.layers.feed_forward import FeedForward  # noqa: E402
from moe_plugin.layers.moe import MoE  # noqa: E402

SHAPES = {
    # name: hidden D, expert FFN F, experts E, top-k K      (activated FFN width K*F ~ 4D in both)
    "coarse": (256, 512, 8, 2),
    "fine": (256, 176, 64, 6),
}


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def router_weight(E: int, D: int, skewed: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Router weight [E, D] and a direction u added to the inputs: skewed routing makes expert 0 hot."""
    w = torch.randn(E, D, generator=gen) * 0.02
    u = torch.zeros(D)
    if skewed:
        u[0] = 3.0
        w[0, 0] = 4.0  # logit of expert 0 ~ 12 for every token: picked by nearly all of them
    return w, u


def build_contenders(shape: str, skewed: bool, tokens: int, only: set[str] | None) -> dict[str, Callable[[], None]]:
    D, F, E, K = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    w_router, u = router_weight(E, D, skewed, gen)
    x = (torch.randn(tokens, D, generator=gen) + u).requires_grad_()
    grad_out = torch.randn(tokens, D, generator=gen)
    contenders: dict[str, Callable[[], None]] = {}

    def want(name: str) -> bool:
        return only is None or name in only

    def step_fn(module: torch.nn.Module, call: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None
            call(x).backward(grad_out)

        return step

    # ours_fused / ours_unfused force the fused local node (kernels/local_moe.py) on or off; "ours" is the default
    for name, fused in (("ours", None), ("ours_fused", True), ("ours_unfused", False)):
        if want(name):
            ours = MoE(D, num_experts=E, top_k=K, expert_hidden_size=F)
            with torch.no_grad():
                ours.router.weight.copy_(w_router)
            if fused is not None:
                ours.fuse_local_routing = fused
            contenders[name] = step_fn(ours, ours)
    if want("dense"):
        dense = FeedForward(D, K * F)
        contenders["dense"] = step_fn(dense, dense)

    try:
        from transformers import MixtralConfig, Qwen3MoeConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:  # transformers is an optional peer
        MixtralConfig = None  # noqa: N806
    if MixtralConfig is not None:
        hf_variants = [("hf_mixtral_eager", "mixtral", "eager"), ("hf_mixtral_grouped_mm", "mixtral", "grouped_mm")]
        hf_variants.append(("hf_qwen3_grouped_mm", "qwen3", "grouped_mm"))
        for name, family, impl in hf_variants:
            if not want(name):
                continue
            if family == "mixtral":
                cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)
                cfg._experts_implementation = impl
                block = MixtralSparseMoeBlock(cfg)
            else:
                cfg = Qwen3MoeConfig(
                    hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True
                )
                cfg._experts_implementation = impl
                block = Qwen3MoeSparseMoeBlock(cfg)
            with torch.no_grad():  # transformers leaves weights uninitialised when built from a config
                for p in block.parameters():
                    p.normal_(std=0.02)
                block.gate.weight.copy_(w_router)
            contenders[name] = step_fn(block, lambda t, b=block: b(t.view(1, -1, D)).view(-1, D))

    if want("ds_cap1") or want("ds_dropless"):
        ds = _deepspeed_contenders(D, F, E, K, w_router, want)
        for name, module in ds.items():
            contenders[name] = step_fn(module, lambda t, m=module: m(t)[0])
    return contenders


def _deepspeed_contenders(D: int, F: int, E: int, K: int, w_router: torch.Tensor, want) -> dict[str, torch.nn.Module]:  # type: ignore[no-untyped-def]
    try:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE as DSMoE
    except ImportError:
        return {}
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="gloo")
    out: dict[str, torch.nn.Module] = {}
    for name, drop in (("ds_cap1", True), ("ds_dropless", False)):
        if not want(name):
            continue
        kw = {"top2_2nd_expert_sampling": False} if K == 2 else {}
        layer = DSMoE(D, FeedForward(D, F), num_experts=E, ep_size=1, k=K, capacity_factor=1.0, drop_tokens=drop, **kw)
        with torch.no_grad():
            layer.deepspeed_moe.gate.wg.weight.copy_(w_router)
        out[name] = layer
    return out


def time_interleaved(contenders: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(s) for name, s in samples.items()}


def peak_memory(fn: Callable[[], None]) -> int:
    fn()  # lazily created state (workspaces, caches) is not counted
    tracker = PeakMemory()
    with tracker:
        fn()
    return tracker.peak


PHASES = {
    "routing": ("topk", "softmax", "_softmax", "linear", "addmm", "logsumexp", "sigmoid"),
    "permute": ("argsort", "sort", "bincount", "index_select", "index_add", "cumsum", "index_put", "scatter"),
    "expert GEMMs": ("_grouped_mm", "mm", "bmm", "silu", "silu_backward", "mul"),
    "combine": (
        "embedding_bag",
        "_embedding_bag",
        "embedding_bag_backward",
        "_embedding_bag_backward",
        "_embedding_bag_dense_backward",
        "_embedding_bag_per_sample_weights_backward",
    ),
}


def phase_breakdown(shape: str, tokens: int) -> dict[str, float]:
    """Self CPU time of our layer's forward+backward, grouped by phase (profiler, one shape, balanced)."""
    from torch.profiler import ProfilerActivity, profile

    fn = build_contenders(shape, False, tokens, {"ours"})["ours"]
    for _ in range(2):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fn()
    totals = {phase: 0.0 for phase in PHASES} | {"other": 0.0}
    for evt in prof.key_averages():
        name = evt.key.removeprefix("aten::")
        phase = next((p for p, ops in PHASES.items() if name in ops), "other")
        totals[phase] += evt.self_cpu_time_total / 1000 / 3
    total = sum(totals.values())
    return {k: round(100 * v / total, 1) for k, v in totals.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--shapes", default="coarse,fine")
    parser.add_argument("--routings", default="balanced,skewed")
    parser.add_argument("--only", default="", help="comma-separated contender names")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="coarse shape, 3 repeats")
    parser.add_argument("--json", default="", help="write results to this JSON file ('-' = stdout)")
    parser.add_argument(
        "--host-allocator",
        choices=("default", "tuned"),
        default="tuned",
        help="tuned (what train.py does, kernels/host_allocator.py): freed memory stays mapped, so timings do not "
        "depend on glibc's adaptive mmap threshold and the page faults it causes; default: glibc as is",
    )
    args = parser.parse_args()
    if args.host_allocator == "tuned":
        from moe_plugin.kernels.host_allocator import keep_freed_host_memory

        keep_freed_host_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = ["coarse"] if args.quick else args.shapes.split(",")
    repeats = 3 if args.quick else args.repeats
    only = set(args.only.split(",")) if args.only else None
    torch.manual_seed(0)

    results = []
    for shape in shapes:
        for routing in args.routings.split(","):
            contenders = build_contenders(shape, routing == "skewed", args.tokens, only)
            times = time_interleaved(contenders, repeats)
            mems = {} if args.no_memory else {name: peak_memory(fn) for name, fn in contenders.items()}
            for name in contenders:
                results.append(
                    {
                        "shape": shape,
                        "routing": routing,
                        "impl": name,
                        "ms": round(times[name], 2),
                        "peak_mib": round(mems[name] / 2**20, 1) if mems else None,
                    }
                )
            print_table([r for r in results if r["shape"] == shape and r["routing"] == routing])
    breakdown = (
        {shape: phase_breakdown(shape, args.tokens) for shape in shapes} if (only is None or "ours" in only) else {}
    )
    for shape, parts in breakdown.items():
        print(f"where the time goes, ours, {shape}, balanced: " + ", ".join(f"{k} {v}%" for k, v in parts.items()))
    ratios = compute_ratios(results)
    for line in ratios:
        print(line["text"])
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "load_average": os.getloadavg(),
        "tokens": args.tokens,
        "repeats": repeats,
        "host_allocator": args.host_allocator,
    }
    payload = {"meta": meta, "results": results, "ratios": ratios, "time_breakdown_percent": breakdown}
    if args.json == "-":
        print(json.dumps(payload, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    dense = next((r for r in rows if r["impl"] == "dense"), None)
    print(f"\n{rows[0]['shape']} / {rows[0]['routing']}")
    print(f"{'impl':<24}{'ms':>10}{'x dense':>10}{'peak MiB':>10}{'mem x dense':>13}")
    for r in rows:
        rel = f"{r['ms'] / dense['ms']:.2f}" if dense else "-"
        mem = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "-"
        mrel = f"{r['peak_mib'] / dense['peak_mib']:.2f}" if dense and r["peak_mib"] and dense["peak_mib"] else "-"
        print(f"{r['impl']:<24}{r['ms']:>10.1f}{rel:>10}{mem:>10}{mrel:>13}")


def compute_ratios(results: list[dict]) -> list[dict]:
    """The issue's targets, as ratios measured in this run."""

    def get(shape: str, routing: str, impl: str, key: str = "ms") -> float | None:
        r = next((r for r in results if (r["shape"], r["routing"], r["impl"]) == (shape, routing, impl)), None)
        return None if r is None else r[key]

    out = []

    def add(name: str, num: float | None, den: float | None, target: float) -> None:
        if num is None or den is None or not den:
            return
        ratio = num / den
        out.append(
            {
                "name": name,
                "ratio": round(ratio, 3),
                "target": target,
                "met": ratio <= target,
                "text": f"{name:<52} {ratio:6.2f}  (target <= {target}) {'met' if ratio <= target else 'NOT met'}",
            }
        )

    # issue 15's targets: ours/dense <= 1.06 coarse and <= 1.15 fine (balanced); ours <= DeepSpeed dropless and
    # <= 1.03x DeepSpeed token-dropping (capacity 1.0), for each routing measured
    add("ours / dense, coarse, balanced", get("coarse", "balanced", "ours"), get("coarse", "balanced", "dense"), 1.06)
    add("ours / dense, fine, balanced", get("fine", "balanced", "ours"), get("fine", "balanced", "dense"), 1.15)
    for shape in ("coarse", "fine"):
        for routing in ("balanced", "skewed"):
            hf = [get(shape, routing, n) for n in ("hf_mixtral_eager", "hf_mixtral_grouped_mm", "hf_qwen3_grouped_mm")]
            hf = [v for v in hf if v is not None]
            add(
                f"ours / best transformers, {shape}, {routing}",
                get(shape, routing, "ours"),
                min(hf) if hf else None,
                0.8,
            )
            ours = get(shape, routing, "ours")
            add(f"ours / deepspeed dropless, {shape}, {routing}", ours, get(shape, routing, "ds_dropless"), 1.0)
            add(f"ours / deepspeed cap 1.0, {shape}, {routing}", ours, get(shape, routing, "ds_cap1"), 1.03)
    for routing in ("balanced", "skewed"):
        add(
            f"peak memory ours / dense, coarse, {routing}",
            get("coarse", routing, "ours", "peak_mib"),
            get("coarse", routing, "dense", "peak_mib"),
            1.5,
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
