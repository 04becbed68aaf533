"""`moe-plugin cost`: device-hours and cost of training a model for a token budget (docs/cost.md).

    moe-plugin cost model=ling_plus hardware=device_d mfu=0.21 tokens=1e12 attention=false
    moe-plugin cost model=ling_plus --compare                       # rank every catalog device
    moe-plugin cost model=ling_plus --compare h100,mi300x,ascend_910b currency=RMB
    moe-plugin cost model=ling_tiny --compare --measured outputs/run/throughput.json
    moe-plugin cost model=ling_plus hardware=h100 throughput=1500   # measured tokens/s per device
    moe-plugin cost --list                                          # the catalog

Keys (key=value): model=NAME and model.* (Hydra model group), hardware=NAME and hardware.* (catalog
entry and field overrides, e.g. hardware.price_per_hour=2.1), mfu (fraction of peak, default 0.21:
the Ling report's implied MFU on device D), tokens (default 1e12), attention (true: count attention
FLOPs at seq_len, as the throughput callback's MFU does; false: 6 x activated params, the report's
convention), seq_len (default model.max_seq_len), throughput (tokens/s per device, replaces mfu),
devices (for wall-clock days), currency, rate.<CUR>=<USD per unit>.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from moe_plugin.accelerators.catalog import DeviceSpec, load_catalog, spec_from_mapping
from moe_plugin.accelerators.cost import CostEstimate, estimate_cost, rank_devices
from moe_plugin.cli.inspect import _fmt

HELP = "Device-hours and cost of a token budget on a catalog device; --compare ranks the catalog."

DEFAULT_MFU = 0.21
OWN_KEYS = ("mfu", "tokens", "attention", "seq_len", "throughput", "devices", "currency")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", default=[], help="model=NAME hardware=NAME mfu=0.21 tokens=1e12 ... (see --help)"
    )
    parser.add_argument(
        "--compare",
        nargs="?",
        const="all",
        default=None,
        help="rank devices by cost: all catalog devices, or a comma-separated list",
    )
    parser.add_argument("--measured", default=None, help="throughput.json written by the throughput callback of a run")
    parser.add_argument("--list", action="store_true", help="print the hardware catalog and exit")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def parse_overrides(
    items: list[str], own_keys: tuple[str, ...] = OWN_KEYS
) -> tuple[dict[str, str], list[str], str | None, dict[str, Any], dict[str, float]]:
    """Split key=value items into our keys, model overrides, hardware name, hardware field overrides, rates."""
    own: dict[str, str] = {}
    model: list[str] = []
    hardware: str | None = None
    hw_fields: dict[str, Any] = {}
    rates: dict[str, float] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{item!r} is not key=value (e.g. model=ling_plus hardware=device_d mfu=0.21).")
        key, value = item.split("=", 1)
        if key == "model" or key.startswith("model."):
            model.append(item)
        elif key == "hardware":
            hardware = value
        elif key.startswith("hardware."):
            from omegaconf import OmegaConf

            hw_fields[key.split(".", 1)[1]] = OmegaConf.from_dotlist([f"v={value}"]).v
        elif key.startswith("rate."):
            rates[key.split(".", 1)[1]] = number(key, value)
        elif key in own_keys:
            own[key] = value
        else:
            raise ValueError(
                f"unknown key {key!r}: use model=, model.*, hardware=, hardware.*, rate.*, or {', '.join(own_keys)}."
            )
    return own, model, hardware, hw_fields, rates


def number(key: str, value: str, kind: type = float) -> Any:
    """`value` as a number, or a ValueError naming `key` (float('abc') names neither)."""
    try:
        out = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a number; give e.g. {key}={EXAMPLES.get(key, '1')}.") from None
    if not out > 0:
        raise ValueError(f"{key}={value!r} must be positive; give e.g. {key}={EXAMPLES.get(key, '1')}.")
    return out


EXAMPLES = {"mfu": "0.21", "tokens": "1e12", "seq_len": "4096", "throughput": "2500"}


def _bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{key}={value!r} must be true or false.")


def model_flops(model_overrides: list[str], seq_len: int | None, attention: bool) -> dict[str, Any]:
    """Parameters and FLOPs per token from `moe-plugin inspect` (one definition of FLOPs everywhere)."""
    from moe_plugin.cli.inspect import inspect_model

    info = inspect_model(model_overrides or ["model=ling_tiny"], seq_len)
    info["flops_used"] = info["flops_per_token"] if attention else info["flops_per_token_no_attention"]
    return info


def load_measured(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--measured {p}: no such file (the throughput callback writes <run dir>/throughput.json).")
    data = json.loads(p.read_text())
    for key in ("hardware", "tokens_per_s_per_device", "flops_per_token", "mfu"):
        if key not in data:
            raise ValueError(f"--measured {p}: missing {key!r}; was it written by ThroughputMonitor?")
    return data


def _priced(specs: list[DeviceSpec]) -> list[DeviceSpec]:
    return [s for s in specs if s.peak_tflops_bf16 is not None and s.price_per_hour > 0]


def _run(args: argparse.Namespace) -> int:
    if args.list:
        return _print_catalog(args.json)
    if args.compare is not None and "=" in args.compare:  # `--compare tokens=1e12`: argparse took an override
        args.overrides = [args.compare, *args.overrides]
        args.compare = "all"
    own, model_overrides, hw_name, hw_fields, rates = parse_overrides(args.overrides)
    if hw_name == "auto":
        from moe_plugin.accelerators.catalog import auto_device

        hw_name = auto_device().name
    attention = _bool("attention", own.get("attention", "true"))
    tokens = number("tokens", own.get("tokens", "1e12"))
    seq_len = number("seq_len", own["seq_len"], int) if "seq_len" in own else None
    measured = load_measured(args.measured) if args.measured else None
    if measured is not None and seq_len is None and measured.get("seq_len"):
        seq_len = int(measured["seq_len"])  # the measured run's context: same FLOPs per token
    info = model_flops(model_overrides, seq_len, attention)
    flops = float(info["flops_used"])
    currency = own.get("currency")
    notes = []

    mfu = number("mfu", own["mfu"]) if "mfu" in own else None
    measured_tps: dict[str, float] = {}
    if measured is not None:
        same_model = abs(measured["flops_per_token"] - info["flops_per_token"]) < 1e-6 * info["flops_per_token"]
        if same_model and attention:
            measured_tps[measured["hardware"]] = float(measured["tokens_per_s_per_device"])
            notes.append(
                f"{measured['hardware']}: measured {measured['tokens_per_s_per_device']:.1f} tokens/s per device"
            )
        else:
            notes.append(
                f"measured run was another model or FLOPs convention: its MFU {measured['mfu']:.3f} on "
                f"{measured['hardware']} is transferred"
            )
        if mfu is None:
            mfu = float(measured["mfu"])
            notes.append(f"other devices assume the measured MFU {mfu:.3f}")
    if "throughput" in own:
        if hw_name is None:
            raise ValueError("throughput=<tokens/s per device> needs hardware=<name> (the device it was measured on).")
        measured_tps[hw_name] = number("throughput", own["throughput"])
    if mfu is None:
        mfu = DEFAULT_MFU
        notes.append(f"mfu={DEFAULT_MFU} assumed (the Ling report's implied MFU on device D); pass mfu=<yours>")

    catalog = load_catalog()
    if (
        measured is not None
        and measured["hardware"] in catalog
        and catalog[measured["hardware"]].peak_tflops_bf16 is None
    ):
        # A measured peak (host CPU): use the run's own figure, not a new measurement under other load.
        catalog[measured["hardware"]] = replace(
            catalog[measured["hardware"]], peak_tflops_bf16=float(measured["peak_tflops"])
        )
    if args.compare is not None:
        if args.compare == "all":
            specs = _priced(list(catalog.values()))
        else:
            names = [n.strip() for n in args.compare.split(",") if n.strip()]
            unknown = [n for n in names if n not in catalog]
            if unknown:
                raise ValueError(f"--compare: {unknown} not in the catalog; choose from {', '.join(sorted(catalog))}.")
            specs = [catalog[n] for n in names]
        if hw_fields and hw_name:
            specs = [spec_from_mapping({**s.__dict__, **hw_fields}) if s.name == hw_name else s for s in specs]
        cur = currency or (specs[0].currency if len({s.currency for s in specs}) == 1 else "USD")
        ranked = rank_devices(specs, flops, tokens, mfu, cur, measured=measured_tps, rates=rates)
        return _print_ranking(
            args.json, info, ranked, attention, notes, number("devices", own["devices"], int) if "devices" in own else 0
        )

    if hw_name is None:
        raise ValueError("give hardware=<name> (see `moe-plugin cost --list`) or --compare to rank the catalog.")
    if hw_name not in catalog:
        raise ValueError(f"hardware={hw_name!r} is not in the catalog. Choose one of: {', '.join(sorted(catalog))}.")
    spec = spec_from_mapping({**catalog[hw_name].__dict__, **hw_fields}) if hw_fields else catalog[hw_name]
    if spec.price_per_hour <= 0 and spec.peak_tflops_bf16 is not None:
        notes.append(f"{spec.name} has no price: set hardware.price_per_hour=<price>")
    if spec.name in measured_tps:
        est = estimate_cost(
            spec, flops, tokens, tokens_per_s_per_device=measured_tps[spec.name], currency=currency, rates=rates
        )
    else:
        est = estimate_cost(spec, flops, tokens, mfu=mfu, currency=currency, rates=rates)
    return _print_single(
        args.json, info, spec, est, attention, notes, number("devices", own["devices"], int) if "devices" in own else 0
    )


def _convention(info: dict[str, Any], attention: bool) -> str:
    if attention:
        return f"6 x activated non-embedding params + attention at seq_len {info['seq_len']}"
    return "6 x activated non-embedding params (no attention term; the Ling report's convention)"


def _print_single(
    as_json: bool,
    info: dict[str, Any],
    spec: DeviceSpec,
    est: CostEstimate,
    attention: bool,
    notes: list[str],
    devices: int,
) -> int:
    out = {
        "model": info["model"],
        "active_params": info["active_params"],
        "flops_convention": _convention(info, attention),
        "hardware": spec.name,
        "peak_tflops": spec.peak_flops / 1e12,
        **est.as_dict(),
        "wall_clock_days": est.wall_clock_days(devices) if devices else None,
        "notes": notes,
    }
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"model {info['model']}: {_fmt(info['active_params'])} activated params")
    print(f"  FLOPs per token   {_fmt(est.flops_per_token)}  ({_convention(info, attention)})")
    print(f"  tokens            {_fmt(est.tokens)}")
    print(f"hardware {spec.name}: {spec.title}")
    print(f"  peak              {spec.peak_flops / 1e12:.1f} TFLOPS (dense bf16)")
    print(f"  MFU               {est.mfu:.3f}  ({est.mode})")
    print(f"  tokens/s/device   {est.tokens_per_s_per_device:,.1f}")
    print(f"  device-hours      {est.device_hours:,.0f}")
    print(f"  price             {est.price_per_hour:g} {est.currency}/device-hour")
    print(f"  cost              {est.cost:,.0f} {est.currency}  ({est.cost / 1e6:.2f}M)")
    print(f"  per 1M tokens     {est.cost_per_million_tokens:.4g} {est.currency}")
    if devices:
        print(f"  wall clock        {est.wall_clock_days(devices):,.1f} days on {devices} devices")
    for n in notes:
        print(f"note: {n}")
    return 0


def _print_ranking(
    as_json: bool, info: dict[str, Any], ranked: list[CostEstimate], attention: bool, notes: list[str], devices: int
) -> int:
    if as_json:
        print(
            json.dumps(
                {
                    "model": info["model"],
                    "flops_convention": _convention(info, attention),
                    "ranking": [
                        e.as_dict() | ({"wall_clock_days": e.wall_clock_days(devices)} if devices else {})
                        for e in ranked
                    ],
                    "notes": notes,
                },
                indent=2,
            )
        )
        return 0
    if not ranked:
        print("no device with both a peak and a price to rank")
        return 1
    cheapest = min((e.cost for e in ranked if e.cost > 0), default=0.0)
    cur = ranked[0].currency
    print(
        f"model {info['model']}, {_fmt(ranked[0].tokens)} tokens, FLOPs/token {_fmt(ranked[0].flops_per_token)} ({_convention(info, attention)})"
    )
    header = f"{'rank':>4} {'device':14s} {'MFU':>6s} {'tok/s/dev':>10s} {'device-hours':>13s} {'price/h':>8s} {'cost ' + cur:>14s} {'per 1M':>8s} {'vs best':>8s}"
    if devices:
        header += f" {'days@' + str(devices):>9s}"
    print(header)
    for i, e in enumerate(ranked, 1):
        line = (
            f"{i:>4} {e.device:14s} {e.mfu:6.3f} {e.tokens_per_s_per_device:10,.0f} {e.device_hours:13,.0f} "
            f"{e.price_per_hour:8.3g} {e.cost:14,.0f} {e.cost_per_million_tokens:8.3g} "
            + (f"{e.cost / cheapest:7.2f}x" if cheapest > 0 else f"{'-':>8s}")
        )
        if devices:
            line += f" {e.wall_clock_days(devices):9.1f}"
        print(line + ("  (measured)" if e.mode == "measured" else ""))
    for n in notes:
        print(f"note: {n}")
    return 0


def _print_catalog(as_json: bool) -> int:
    catalog = load_catalog()
    if as_json:
        print(json.dumps({n: s.__dict__ for n, s in catalog.items()}, indent=2, default=list))
        return 0
    print(f"{'name':14s} {'TFLOPS':>7s} {'mem GB':>7s} {'TB/s':>6s} {'price/h':>9s} {'fp8':>4s}  title")
    for n, s in sorted(catalog.items(), key=lambda kv: (kv[0][:7] != "device_", kv[0])):
        peak = "measure" if s.peak_tflops_bf16 is None else f"{s.peak_tflops_bf16:g}"
        mem = "-" if s.memory_gb is None else f"{s.memory_gb:g}"
        bw = "-" if s.memory_bandwidth_tbs is None else f"{s.memory_bandwidth_tbs:g}"
        print(
            f"{n:14s} {peak:>7s} {mem:>7s} {bw:>6s} {s.price_per_hour:>5g} {s.currency:3s} {'yes' if s.fp8 else 'no':>4s}  {s.title}"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    """Bad input exits 2 with a one-paragraph message (no traceback)."""
    import sys

    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"moe-plugin cost: {err}", file=sys.stderr)
        return 2
