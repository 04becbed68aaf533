"""`moe-plugin plan`: which (EP, shard, replicate, checkpointing, micro-batch) layouts fit a device, how
fast they run and what 1T tokens cost; for the others, which memory term does not fit (docs/planning.md).

    moe-plugin plan model=ling_plus hardware=device_d devices=1024
    moe-plugin plan model=ling_plus hardware=device_a devices=512 precision=bf16-mixed micro_batch=1,2
    moe-plugin plan model=ling_lite hardware=h800 devices=64 checkpointing=full shard=64 --json
    moe-plugin plan model=ling_lite hardware=h800 devices=64 expert_shard=auto,1   # also whole experts per replica

Keys (key=value): model=NAME and model.*; hardware=NAME and hardware.* (catalog entry and field
overrides, e.g. hardware.memory_gb=96); devices (required); seq_len (default model.max_seq_len);
micro_batch, ep, shard, checkpointing (one value or a comma-separated list to consider; default all;
checkpointing `full` = model.activation_checkpointing=full, `selective` = the routed experts only,
model.activation_checkpointing=selective model.activation_checkpointing_target=experts);
expert_shard (strategy.expert_shard_size values to consider, comma-separated: `auto` = the default, every
expert fully sharded over its W / EP data-parallel ranks, or a number; default auto);
precision (32-true | bf16-mixed | bf16-true, default bf16-mixed); mfu (fraction of peak while computing,
default 0.21); usable (fraction of device memory for tensors, default 0.9); global_batch (sequences per
optimizer step; default one micro-batch per rank); imbalance (busiest rank's routed copies / the mean,
default 1.0); node_size, intra_gbs, inter_gbs (interconnect; defaults 8, 200, 50); tokens (default 1e12);
currency; rate.<CUR>=<USD per unit>; top (rows of fitting layouts to print, default 10).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from moe_plugin.accelerators.catalog import load_catalog, spec_from_mapping
from moe_plugin.cli.cost import DEFAULT_MFU, parse_overrides
from moe_plugin.cli.inspect import _fmt, build_meta_model
from moe_plugin.parallel.plan import (
    CHECKPOINTING,
    GB,
    Interconnect,
    PlanEntry,
    PlanResult,
    get_precision,
    model_shape,
    plan,
)

HELP = "Layouts (EP, shard, replicate, checkpointing, micro-batch) that fit a device: memory per rank, step time, cost."

OWN_KEYS = (
    "devices",
    "seq_len",
    "micro_batch",
    "ep",
    "shard",
    "checkpointing",
    "expert_shard",
    "precision",
    "mfu",
    "usable",
    "global_batch",
    "imbalance",
    "node_size",
    "intra_gbs",
    "inter_gbs",
    "tokens",
    "currency",
    "top",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", default=[], help="model=NAME hardware=NAME devices=N [key=value ...] (see --help)"
    )
    parser.add_argument("--all", action="store_true", help="print every layout that does not fit, with its reason")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _number(key: str, value: str, kind: type = float) -> Any:
    try:
        return kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} must be {'an integer' if kind is int else 'a number'}.") from None


def _ints(key: str, value: str) -> tuple[int, ...]:
    out = tuple(_number(key, v.strip(), int) for v in value.split(",") if v.strip())
    if not out or any(v < 1 for v in out):
        raise ValueError(f"{key}={value!r} must be positive integers, e.g. {key}=1 or {key}=1,2,4.")
    return out


def _expert_shards(value: str) -> tuple[int | None, ...]:
    """expert_shard=auto,1,2 -> (None, 1, 2): None is the mesh's default rule (ES = W / EP)."""
    out = tuple(None if v.strip() == "auto" else _ints("expert_shard", v)[0] for v in value.split(",") if v.strip())
    if not out:
        raise ValueError(f"expert_shard={value!r} must be `auto` or positive integers, e.g. expert_shard=auto,1.")
    return out


def build_plan(overrides: list[str]) -> PlanResult:
    """Parse the overrides, build the model on the meta device, and plan every layout."""
    own, model_overrides, hw_name, hw_fields, rates = parse_overrides(overrides, OWN_KEYS)
    if hw_name is None:
        raise ValueError("give hardware=<name> (see `moe-plugin cost --list`), e.g. hardware=device_d.")
    if "devices" not in own:
        raise ValueError("give devices=<number of accelerators>, e.g. devices=1024.")
    catalog = load_catalog()
    if hw_name not in catalog:
        raise ValueError(f"hardware={hw_name!r} is not in the catalog. Choose one of: {', '.join(sorted(catalog))}.")
    spec = spec_from_mapping({**catalog[hw_name].__dict__, **hw_fields}) if hw_fields else catalog[hw_name]
    if "currency" in own or rates:
        from moe_plugin.accelerators.catalog import with_price

        cur = own.get("currency", spec.currency)
        spec = with_price(spec, spec.price_in(cur, rates), cur)
    ckpt = tuple(own.get("checkpointing", ",".join(CHECKPOINTING)).split(","))
    bad = [c for c in ckpt if c not in CHECKPOINTING]
    if bad:
        raise ValueError(
            f"checkpointing={bad[0]!r} must be one of {', '.join(CHECKPOINTING)} (or a comma-separated list)."
        )
    seq_len = _number("seq_len", own["seq_len"], int) if "seq_len" in own else None
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1.")
    mfu = _number("mfu", own.get("mfu", str(DEFAULT_MFU)))
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} must be a fraction in (0, 1], e.g. mfu=0.21.")
    net = Interconnect(
        _number("node_size", own.get("node_size", "8"), int),
        _number("intra_gbs", own.get("intra_gbs", "200")),
        _number("inter_gbs", own.get("inter_gbs", "50")),
    )
    if net.devices_per_node < 1 or net.intra_gbs <= 0 or net.inter_gbs <= 0:
        raise ValueError("node_size, intra_gbs and inter_gbs must be > 0.")
    name, model, seq_len = build_meta_model(model_overrides or ["model=ling_tiny"], seq_len)
    shape = model_shape(model, seq_len, name)
    global_batch = _number("global_batch", own["global_batch"], int) if "global_batch" in own else None
    if global_batch is not None and global_batch < 1:
        raise ValueError(f"global_batch={global_batch} must be >= 1 (sequences per optimizer step).")
    tokens = _number("tokens", own.get("tokens", "1e12"))
    if tokens <= 0:
        raise ValueError(f"tokens={tokens} must be > 0.")
    return plan(
        shape,
        spec,
        _number("devices", own["devices"], int),
        get_precision(own.get("precision", "bf16-mixed")),
        mfu,
        net,
        micro_batches=_ints("micro_batch", own.get("micro_batch", "1,2,4,8")),
        checkpointing=ckpt,
        eps=_ints("ep", own["ep"]) if "ep" in own else None,
        shards=_ints("shard", own["shard"]) if "shard" in own else None,
        expert_shards=_expert_shards(own.get("expert_shard", "auto")),
        usable_fraction=_number("usable", own.get("usable", "0.9")),
        global_batch=global_batch,
        imbalance=_number("imbalance", own.get("imbalance", "1.0")),
        tokens=tokens,
    )


def replicated_verdict(result: PlanResult) -> dict[str, Any]:
    """Today's layout (shard=1: dense part replicated on every rank): does any EP size fit?"""
    ddp = [e for e in result.entries if e.layout.shard == 1 and e.memory is not None]
    best = min(ddp, key=lambda e: e.memory.peak, default=None)  # type: ignore[union-attr]
    return {
        "fits": any(e.fits for e in ddp),
        "smallest": best.as_dict() if best is not None else None,
    }


def unfit_groups(result: PlanResult) -> list[PlanEntry]:
    """For each (EP, shard) with no fitting variant, its smallest-memory variant (why even that fails)."""
    groups: dict[tuple[int, int], list[PlanEntry]] = {}
    for e in result.entries:
        groups.setdefault((e.layout.ep, e.layout.shard), []).append(e)
    out = []
    for key in sorted(groups):
        entries = groups[key]
        if any(e.fits for e in entries):
            continue
        sized = [e for e in entries if e.memory is not None]
        if sized:  # the smallest variant; on ties the one a user would try first (full checkpointing, mb=1)
            out.append(
                min(sized, key=lambda e: (e.memory.peak, e.layout.checkpointing != "full", e.layout.micro_batch))
            )  # type: ignore[union-attr]
    return out


def unbuildable(result: PlanResult) -> list[PlanEntry]:
    """Layouts that cannot exist at all (a size does not divide another), one per (EP, shard)."""
    seen: dict[tuple[int, int], PlanEntry] = {}
    for e in result.entries:
        if e.memory is None:
            seen.setdefault((e.layout.ep, e.layout.shard), e)
    return list(seen.values())


def to_json(result: PlanResult) -> dict[str, Any]:
    s = result.shape
    fitting = result.fitting
    rec = result.recommended()
    return {
        "model": s.name,
        "total_params": s.total_params,
        "active_params": s.active_params,
        "dense_params": s.dense_params,
        "expert_params": s.expert_params,
        "seq_len": s.seq_len,
        "hardware": result.spec.name,
        "memory_gb": result.spec.memory_gb,
        "usable_gb": result.usable_bytes / GB,
        "precision": result.precision.name,
        "devices": result.entries[0].layout.world if result.entries else None,
        "fastest": fitting[0].as_dict() if fitting else None,
        "recommended": rec.as_dict() if rec is not None else None,
        "fits": [e.as_dict() for e in fitting],
        "does_not_fit": [e.as_dict() for e in result.not_fitting],
        "replicated_dense": replicated_verdict(result),
    }


def _row(i: int, e: PlanEntry) -> str:
    L, m, t, c = e.layout, e.memory, e.time, e.cost
    assert m is not None and t is not None
    cost = f"{c.cost / 1e6:9.2f}M {c.currency}" if c is not None else f"{'-':>13s}"
    mfu = f"{c.mfu:5.3f}" if c is not None else "  -  "
    return (
        f"{i:>4} {L.ep:>4} {L.shard:>5} {L.replicate:>5} {L.expert_shard:>4} {L.checkpointing:>9} {L.micro_batch:>3} "
        f"{m.peak / GB:8.1f} {t.step_s:8.2f} {t.tokens_per_s_per_device:10,.0f} {mfu} {cost}"
    )


def print_text(result: PlanResult, show_all: bool, top: int) -> None:
    s, spec = result.shape, result.spec
    print(
        f"model {s.name}: {_fmt(s.total_params)} params ({_fmt(s.expert_params)} routed experts, "
        f"{_fmt(s.dense_params)} dense), {_fmt(s.active_params)} activated; seq_len {s.seq_len}, {result.precision.name}"
    )
    devices = result.entries[0].layout.world if result.entries else 0
    print(
        f"hardware {spec.name}: {spec.memory_gb:g} GB ({result.usable_bytes / GB:.1f} GB usable), "
        f"{spec.peak_flops / 1e12:g} TFLOPS, {spec.price_per_hour:g} {spec.currency}/h; {devices} devices"
    )
    fitting = result.fitting
    print(f"\n{len(fitting)} of {len(result.entries)} layouts fit; fastest per token first:")
    if fitting:
        print(
            f"{'rank':>4} {'EP':>4} {'shard':>5} {'rep':>5} {'ES':>4} {'ckpt':>9} {'mb':>3} {'peak GB':>8} {'step s':>8} "
            f"{'tok/s/dev':>10} {'MFU':>5} {'cost per 1T tok':>15}"
        )
        for i, e in enumerate(fitting[:top], 1):
            print(_row(i, e))
        rec = result.recommended()
        assert rec is not None and rec.memory is not None
        terms = {k: v for k, v in rec.memory.terms.items() if v > 0 and "." not in k}
        print(
            f"\nrecommended (most headroom within 2% of the fastest): {rec.layout.label()}, "
            f"peak {rec.memory.peak / GB:.1f} GB at the {rec.memory.phase}; GB per rank:"
        )
        print("  " + ", ".join(f"{k} {v / GB:.2f}" for k, v in sorted(terms.items(), key=lambda kv: -kv[1])))
    verdict = replicated_verdict(result)
    if not verdict["fits"] and verdict["smallest"] is not None:
        sm = verdict["smallest"]
        print(
            f"\ntoday's layout (shard=1, dense part replicated on every rank) fits at NO expert-parallel size; "
            f"the smallest, EP{sm['ep']} ckpt={sm['checkpointing']} mb={sm['micro_batch']}, {sm['reason']}"
        )
    unfit = unfit_groups(result) if not show_all else [e for e in result.not_fitting if e.memory is not None]
    if unfit:
        print(
            "\ndoes not fit"
            + (" (every layout):" if show_all else " (per EP x shard, its smallest variant; --all for every layout):")
        )
        for e in unfit:
            L = e.layout
            print(
                f"  EP{L.ep:<3} shard{L.shard:<5} rep{L.replicate:<5} ckpt={L.checkpointing:<9} mb={L.micro_batch}: {e.reason}"
            )
    impossible = unbuildable(result)
    if impossible:
        print(
            f"\ncannot be built ({len(impossible)} EP x shard pairs), e.g. EP{impossible[0].layout.ep} shard{impossible[0].layout.shard}: {impossible[0].reason}"
        )
    print(
        "\nmodel: docs/planning.md (activations of this code's autograd graph, FSDP2 units per block, ring "
        "collectives; compute at mfu, recomputation and exposed all-to-all on top)"
    )


def run(args: argparse.Namespace) -> int:
    """Bad input exits 2 with a one-paragraph message (no traceback)."""
    try:
        result = build_plan(args.overrides)
        own = parse_overrides(args.overrides, OWN_KEYS)[0]
        top = _number("top", own.get("top", "10"), int)
    except (ValueError, FileNotFoundError) as err:
        print(f"moe-plugin plan: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(result), indent=2))
    else:
        print_text(result, args.all, top)
    return 0
