"""EP x FSDP2 sharding vs EP with a replicated dense part: per-rank memory and step time, 4 gloo processes.

    python bench/sharded.py                  # table (4 processes, ~100M-parameter MoE)
    python bench/sharded.py --json
    python bench/sharded.py --steps 3 --threads 1

Layouts (all on 4 processes, the same global batch):
- ep2_ddp: EP 2, dense part replicated (DDP), the model built whole on every rank then sliced (S = 1);
- ep2_s2:  EP 2 x shard 2: dense part sharded over 2, replicated over 2; experts fully sharded over their 2
           expert-data-parallel ranks (ES = W / EP = 2); built on the meta device;
- ep2_s4:  EP 2 x shard 4: dense part sharded over 4; experts fully sharded over their 2 DP ranks (ES 2);
- variants (--layouts): ep2_s2_keep (no resharding after forward), ep2_s2_native (gloo's own all-gather and
  reduce-scatter instead of parallel/fsdp_comms.py's point-to-point form, the default on gloo), ep2_s2_allreduce
  (fsdp_comms.py's all_reduce form), ep2_s2_es1 (strategy.expert_shard_size=1: whole experts on both replicas).
--profile adds torch.profiler's view of the slowest rank: ms per step inside FSDP2's hooks (all-gather copy-in,
waits, copy-out, reduce-scatter), inside c10d calls, and the top operators by self time and allocated bytes.
Per layout, the largest rank's:
- state MB: bytes of this rank's parameters + gradients + AdamW moments (exact, from the tensors);
- setup MB / peak MB: resident-set growth over the process's baseline (after imports and process-group
  start) at the end of set-up, and at the end of the run (ru_maxrss: the peak, activations included);
- step ms: median over the timed steps of the slowest rank's forward + backward + optimizer step, and the
  time inside collectives the timer sees (synchronous calls and async launches, not FSDP's waits nor DDP's
  C++ bucket all-reduce: use --profile for FSDP's share).
Also: set-up peak for a model of P parameters built on the meta device on W = 1, 2, 4 ranks (EP W x shard W),
to show it scales as P / W.
Targets (issue 10): ep2_s2 peak <= 0.6 x ep2_ddp; ep2_s2 step time <= 1.3 x ep2_ddp on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL = {
    "vocab_size": 16384,
    "hidden_size": 512,
    "num_layers": 6,
    "num_heads": 8,
    "head_dim": 64,
    "moe": {"num_experts": 8, "top_k": 2, "expert_hidden_size": 1024, "num_shared_experts": 1, "routing_warmup": False},
}
# name -> (EP, S, keyword arguments of apply_sharded_data_parallel)
LAYOUTS: dict[str, tuple[int, int, dict[str, Any]]] = {
    "ep2_ddp": (2, 1, {}),
    "ep2_s2": (2, 2, {}),
    "ep2_s4": (2, 4, {}),
}
# levers measured with --variants (docs/performance.md)
VARIANTS: dict[str, tuple[int, int, dict[str, Any]]] = {
    "ep2_s2_keep": (2, 2, {"reshard_after_forward": False}),  # no all-gather in backward, whole blocks kept
    "ep2_s2_native": (2, 2, {"comms": "native"}),  # gloo's own all-gather / reduce-scatter (fsdp_comms.py)
    "ep2_s2_allreduce": (2, 2, {"comms": "all_reduce"}),  # each as one all_reduce (the previous default)
    "ep2_s2_es1": (2, 2, {"expert_shard_size": 1}),  # experts not sharded: no expert all-gathers, more memory
}
_COLLECTIVE = [0.0]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_collectives() -> None:
    for name in (
        "all_to_all_single",
        "all_reduce",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "all_gather_single",  # FSDP2's own calls (torch 2.13): async, so their waits are missed here
        "reduce_scatter_single",
        "broadcast",
    ):
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*a: Any, _fn: Any = fn, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                _COLLECTIVE[0] += time.perf_counter() - t0

        setattr(dist, name, wrapped)
    from moe_plugin.parallel import fsdp_comms  # the point-to-point forms: launch and wait together

    exchange = fsdp_comms._exchange

    def timed_exchange(ops: Any) -> None:
        t0 = time.perf_counter()
        try:
            exchange(ops)
        finally:
            _COLLECTIVE[0] += time.perf_counter() - t0

    fsdp_comms._exchange = timed_exchange


def _union_ms(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (us -> ms): nested or overlapping events count once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def _profile_summary(prof: Any, steps: int) -> dict[str, Any]:
    """Per-step ms of the main thread inside FSDP2's hooks (all-gather copy-in, the wait, copy-out, reduce-scatter,
    resharding), inside c10d collectives (the calling side), in the all-to-all, and the top operators."""
    fsdp: list[tuple[float, float]] = []
    c10d: list[tuple[float, float]] = []
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for e in prof.events():
        name = e.name
        span = (e.time_range.start, e.time_range.end)
        if name.startswith("FSDP::"):
            fsdp.append(span)
            by_kind.setdefault(name.split(" (")[0].split(" for ")[0], []).append(span)
        elif name.startswith(("c10d::", "gloo:", "record_param_comms")):
            c10d.append(span)
    top = sorted(prof.key_averages(), key=lambda k: -k.self_cpu_time_total)[:12]
    return {
        "fsdp_hooks_ms": _union_ms(fsdp) / steps,
        "c10d_ms": _union_ms(c10d) / steps,
        "fsdp_by_kind_ms": {k: round(_union_ms(v) / steps, 1) for k, v in sorted(by_kind.items())},
        "top_self_ms": {k.key: round(k.self_cpu_time_total / 1e3 / steps, 1) for k in top},
        "top_self_mb": {
            k.key: round(k.self_cpu_memory_usage / 2**20 / steps, 1)
            for k in sorted(prof.key_averages(), key=lambda k: -k.self_cpu_memory_usage)[:8]
        },
    }


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _worker(
    rank: int,
    world: int,
    port: int,
    layout: str,
    ep: int,
    shard: int,
    steps: int,
    threads: int,
    q: Any,
    profile: bool = False,
    options: dict[str, Any] | None = None,
) -> None:
    torch.set_num_threads(threads)
    _time_collectives()  # in this (spawned) process: the parent's patch does not carry over
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    from moe_plugin.layers.moe import collect_aux_losses
    from moe_plugin.models.decoder import MoEDecoderLM
    from moe_plugin.parallel.apply import apply_expert_parallel
    from moe_plugin.parallel.grads import exclude_from_ddp, reduce_expert_gradients
    from moe_plugin.parallel.materialise import materialise_, meta_init_context
    from moe_plugin.parallel.mesh import build_expert_parallel_mesh
    from moe_plugin.parallel.sharding import apply_sharded_data_parallel

    base = _rss_mb()
    options = dict(options or {})
    mesh = build_expert_parallel_mesh(
        ep, data_parallel_shard_size=shard, expert_shard_size=options.pop("expert_shard_size", None)
    )
    if shard > 1 or layout.startswith("setup"):
        with meta_init_context():
            model = MoEDecoderLM(**MODEL)
        plan = apply_expert_parallel(model, mesh)
        if shard > 1:
            apply_sharded_data_parallel(model, mesh, **options)
        materialise_(model, 0, "cpu", plan.expert_params)
        wrapped = model
    else:
        torch.manual_seed(0)
        model = MoEDecoderLM(**MODEL)
        plan = apply_expert_parallel(model, mesh)
        exclude_from_ddp(model, plan.expert_params)
        wrapped = DistributedDataParallel(model)
    total = sum(p.numel() for p in model.parameters())  # global numel of DTensors, local of EP slices
    setup_mb = _peak_mb() - base
    result: dict[str, Any] = {"rank": rank, "setup_mb": setup_mb, "params": total}
    if layout.startswith("setup"):
        q.put(result)
        dist.destroy_process_group()
        return
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    expert = [p for n, p in model.named_parameters() if n in plan.expert_params]
    g = torch.Generator().manual_seed(rank)
    times, comm = [], []
    phases: dict[str, float] = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    prof = None
    for step in range(steps + 1):
        batch = torch.randint(0, MODEL["vocab_size"], (2, 129), generator=g)
        dist.barrier()
        if step == 1 and profile:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            prof.__enter__()
        _COLLECTIVE[0] = 0.0
        t0 = time.perf_counter()
        logits = wrapped(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)) + collect_aux_losses(
            model
        )
        phases["forward"] = max(phases["forward"], _rss_mb() - base)
        del logits
        loss.backward()
        if shard == 1:
            reduce_expert_gradients(expert, mesh.expert_data_group, world)
        phases["backward"] = max(phases["backward"], _rss_mb() - base)
        opt.step()
        phases["optimizer"] = max(phases["optimizer"], _rss_mb() - base)
        opt.zero_grad(set_to_none=False)
        if step > 0:  # the first step allocates optimizer state
            times.append(time.perf_counter() - t0)
            comm.append(_COLLECTIVE[0])
    if prof is not None:
        prof.__exit__(None, None, None)
        result["profile"] = _profile_summary(prof, steps)
    result["rss_after_mb"] = phases
    state = 0
    for p in model.parameters():
        state += _local(p).numel() * _local(p).element_size() * 2  # weight + gradient
        for v in opt.state[p].values():
            if torch.is_tensor(v) and v.dim() > 0:
                state += _local(v).numel() * _local(v).element_size()
    result.update(
        state_mb=state / 2**20,
        peak_mb=_peak_mb() - base,
        step_ms=[t * 1e3 for t in times],
        comm_ms=[c * 1e3 for c in comm],
    )
    q.put(result)
    dist.destroy_process_group()


def _run(
    layout: str,
    world: int,
    ep: int,
    shard: int,
    steps: int,
    threads: int,
    profile: bool = False,
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(
        _worker,
        args=(world, port, layout, ep, shard, steps, threads, q, profile, options),
        nprocs=world,
        start_method="spawn",
    )
    return sorted((q.get() for _ in range(world)), key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {[*LAYOUTS, *VARIANTS]}")
    parser.add_argument("--profile", action="store_true", help="torch.profiler on every rank: where the time goes")
    parser.add_argument("--no-setup", action="store_true", help="skip the set-up scaling runs")
    parser.add_argument(
        "--malloc",
        choices=("pinned", "default"),
        default="pinned",
        help="pinned: MALLOC_MMAP_THRESHOLD_=128 KiB, every tensor its own mapping returned when freed, so resident "
        "memory follows live tensors (as bench/memory_plan.py); default: glibc's adaptive threshold (heap slack)",
    )
    args = parser.parse_args()
    if args.malloc == "pinned":  # read by glibc at process start: the spawned workers inherit it
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    rows: dict[str, Any] = {}
    chosen = {n: {**LAYOUTS, **VARIANTS}[n] for n in args.layouts.split(",")}
    for name, (ep, shard, options) in chosen.items():
        ranks = _run(name, 4, ep, shard, args.steps, args.threads, args.profile, options)
        steps = [max(r["step_ms"][i] for r in ranks) for i in range(args.steps)]
        slowest = max(range(4), key=lambda i: statistics.median(ranks[i]["step_ms"]))
        least_comm = min(statistics.median(r["comm_ms"]) for r in ranks)
        rows[name] = {
            "state_mb": max(r["state_mb"] for r in ranks),
            "setup_mb": max(r["setup_mb"] for r in ranks),
            "peak_mb": max(r["peak_mb"] for r in ranks),
            "step_ms": statistics.median(steps),
            "collective_ms": least_comm,
            "slowest_rank": slowest,
            # resident growth after forward / backward / optimizer step (largest rank, over the steps)
            "rss_after_mb": {k: max(r["rss_after_mb"][k] for r in ranks) for k in ranks[0]["rss_after_mb"]},
        }
        if args.profile:  # the slowest rank's profile
            rows[name]["profile"] = ranks[slowest]["profile"]
    params = _run("setup_w1", 1, 1, 1, 0, args.threads)[0]["params"]
    setup = {}
    for w in () if args.no_setup else (1, 2, 4):
        ranks = _run(f"setup_w{w}", w, w, w if w > 1 else 1, 0, args.threads)
        setup[w] = max(r["setup_mb"] for r in ranks)
    ref = rows.get("ep2_ddp") or next(iter(rows.values()))
    out = {
        "model_parameters": params,
        "layouts": rows,
        "ratios_vs_ep2_ddp": {
            k: {
                "state": v["state_mb"] / ref["state_mb"],
                "peak": v["peak_mb"] / ref["peak_mb"],
                "step": v["step_ms"] / ref["step_ms"],
            }
            for k, v in rows.items()
        },
        "setup_peak_mb_by_world": setup,
        "threads": args.threads,
        "malloc": args.malloc,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"model: {params / 1e6:.1f}M parameters; 4 gloo processes, {args.threads} thread(s) each, malloc {args.malloc}"
    )
    print(
        f"{'layout':10s} {'state MB':>9s} {'setup MB':>9s} {'peak MB':>8s} {'step ms':>8s} {'in coll.':>9s}  state/peak/step vs ep2_ddp"
    )
    for k, v in rows.items():
        r = out["ratios_vs_ep2_ddp"][k]
        print(
            f"{k:10s} {v['state_mb']:9.0f} {v['setup_mb']:9.0f} {v['peak_mb']:8.0f} {v['step_ms']:8.0f} "
            f"{v['collective_ms']:9.0f}  {r['state']:.2f} / {r['peak']:.2f} / {r['step']:.2f}"
        )
        print(f"{'':10s} resident after forward / backward / step: {v['rss_after_mb']}")
        if "profile" in v:
            print(f"{'':10s} profile (ms per step, slowest rank): {json.dumps(v['profile'])}")
    print("set-up peak (meta build + materialise, EP W x shard W):", {w: round(m) for w, m in setup.items()}, "MB")


if __name__ == "__main__":
    main()
