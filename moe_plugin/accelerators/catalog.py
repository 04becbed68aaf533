"""Device catalog: the `hardware` config group (moe_plugin/conf/hardware/*.yaml) as typed specs.

Each entry gives peak dense bf16 TFLOPS, memory, memory bandwidth, an hourly price and its currency.
The paper's anonymised devices A-E carry the report's own figures (RMB); named devices carry public
datasheet figures and an *indicative* price the user is expected to override
(`hardware.price_per_hour=...`, `hardware.currency=...`).

Prices in different currencies are compared through `EXCHANGE_RATES` (USD per unit, indicative,
2025; override with `rate.RMB=0.139` on the command line).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

HARDWARE_DIR = Path(__file__).resolve().parents[1] / "conf" / "hardware"

# USD per unit of currency (indicative, 2025). Only used when ranking devices priced in different currencies.
EXCHANGE_RATES: dict[str, float] = {"USD": 1.0, "RMB": 0.14, "CNY": 0.14, "EUR": 1.08}

# Entries of the hardware group that are not devices.
_NOT_DEVICES = ("auto",)


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    title: str = ""
    vendor: str | None = None  # vendor profile name (cuda, rocm, npu, ...) or None when anonymised/unsupported
    peak_tflops_bf16: float | None = None  # None: measure at run time (host CPU)
    memory_gb: float | None = None
    memory_bandwidth_tbs: float | None = None
    price_per_hour: float = 0.0
    currency: str = "USD"
    fp8: bool = False
    match: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""

    @property
    def peak_flops(self) -> float:
        """Peak dense bf16 FLOP/s (measured for the host CPU when the catalog has no figure)."""
        if self.peak_tflops_bf16 is None:
            return measured_peak_flops()
        return float(self.peak_tflops_bf16) * 1e12

    def price_in(self, currency: str, rates: dict[str, float] | None = None) -> float:
        """Hourly price converted to `currency` through USD."""
        return convert(self.price_per_hour, self.currency, currency, rates)


def convert(amount: float, src: str, dst: str, rates: dict[str, float] | None = None) -> float:
    if src == dst:
        return amount
    table = {**EXCHANGE_RATES, **(rates or {})}
    missing = [c for c in (src, dst) if c not in table]
    if missing:
        raise ValueError(
            f"no exchange rate for {', '.join(missing)}: known {sorted(table)}. Add one, e.g. rate.{missing[0]}=<USD per unit>."
        )
    return amount * table[src] / table[dst]


def spec_from_mapping(data: dict[str, Any]) -> DeviceSpec:
    """Build a spec from a (possibly user-overridden) mapping, naming unknown keys."""
    known = {f.name for f in fields(DeviceSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"hardware: unknown key(s) {unknown}; known keys: {sorted(known)}.")
    values = dict(data)
    if "name" not in values:
        raise ValueError("hardware: every entry needs a `name`.")
    values["match"] = tuple(values.get("match") or ())
    for key in ("peak_tflops_bf16", "memory_gb", "memory_bandwidth_tbs", "price_per_hour"):
        v = values.get(key)
        if v is not None and float(v) < 0:
            raise ValueError(f"hardware.{key}={v} must be >= 0.")
    if values.get("peak_tflops_bf16") is not None and float(values["peak_tflops_bf16"]) == 0:
        raise ValueError("hardware.peak_tflops_bf16=0: give the device's peak dense bf16 TFLOPS (or null to measure).")
    return DeviceSpec(**values)


def check_hardware_config(data: dict[str, Any]) -> None:
    """Validate a composed `hardware` group (a catalog entry with overrides, or `auto` plus overrides):
    keys and value ranges, before any data or model is built."""
    spec_from_mapping(data)


def load_catalog(directory: Path = HARDWARE_DIR) -> dict[str, DeviceSpec]:
    """Every device entry of the hardware group, by name."""
    from omegaconf import OmegaConf

    catalog = {}
    for path in sorted(directory.glob("*.yaml")):
        if path.stem in _NOT_DEVICES:
            continue
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        spec = spec_from_mapping(data)  # type: ignore[arg-type]
        if spec.name != path.stem:
            raise ValueError(f"{path}: name {spec.name!r} must equal the file name {path.stem!r}.")
        catalog[spec.name] = spec
    return catalog


def get_device(name: str, overrides: dict[str, Any] | None = None) -> DeviceSpec:
    """A catalog entry by name, with field overrides (e.g. {"price_per_hour": 2.0})."""
    catalog = load_catalog()
    if name not in catalog:
        raise ValueError(f"hardware={name!r} is not in the catalog. Choose one of: {', '.join(sorted(catalog))}.")
    spec = catalog[name]
    if overrides:
        spec = spec_from_mapping({**spec.__dict__, **overrides})
    return spec


def match_device(device_name: str, catalog: dict[str, DeviceSpec] | None = None) -> DeviceSpec | None:
    """The catalog entry one of whose `match` regexes (case-insensitive) occurs in a detected device name."""
    for spec in (catalog or load_catalog()).values():
        for pattern in spec.match:
            if re.search(pattern, device_name, re.IGNORECASE):
                return spec
    return None


def auto_device() -> DeviceSpec:
    """`hardware=auto`: the catalog entry of the detected accelerator, else the host CPU entry."""
    from moe_plugin.accelerators.detect import detected

    catalog = load_catalog()
    primary = detected().primary
    if primary.profile.name != "cpu":
        for dev in primary.devices:
            spec = match_device(dev.name, catalog)
            if spec is not None:
                return spec
        raise ValueError(
            f"hardware=auto: no catalog entry matches {primary.devices[0].name!r}. "
            "Set hardware=<name> (see `moe-plugin cost --list`) or add conf/hardware/<name>.yaml."
        )
    return catalog["cpu"]


_MEASURED: dict[str, float] = {}


def measured_peak_flops(size: int = 1024, seconds: float = 0.5) -> float:
    """Achievable fp32 matmul FLOP/s of the host CPU: the best single matmul over `seconds`.

    Measured once per process and thread count. The best call, not the mean, because other
    processes on a shared machine only ever slow a call down.
    """
    key = f"{torch.get_num_threads()}"
    if key not in _MEASURED:
        a = torch.randn(size, size)
        b = torch.randn(size, size)
        a @ b  # warm-up
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _MEASURED[key] = 2.0 * size**3 / best
    return _MEASURED[key]


def with_price(spec: DeviceSpec, price_per_hour: float | None, currency: str | None) -> DeviceSpec:
    """Copy of a spec with a user price and/or currency."""
    if price_per_hour is None and currency is None:
        return spec
    return replace(
        spec,
        price_per_hour=spec.price_per_hour if price_per_hour is None else float(price_per_hour),
        currency=spec.currency if currency is None else currency,
    )
