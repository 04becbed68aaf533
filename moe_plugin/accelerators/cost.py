"""Compute cost of training tokens on a device: the formulas behind `moe-plugin cost` and the
throughput callback (docs/cost.md works the paper's example through them).

    F        = FLOPs per token (training: forward + backward), from models/inspect.flops_per_token
    FLOPs    = F * tokens
    rate     = MFU * peak                      (FLOP/s one device sustains)
    hours    = FLOPs / rate / 3600             (device-hours)
    cost     = hours * price_per_hour
    per_1M   = cost / tokens * 1e6
Measured mode replaces the assumed MFU by a measured throughput (tokens/s per device):
    hours    = tokens / tokens_per_s / 3600,   MFU = tokens_per_s * F / peak

With Ling-Plus (28.8B activated), F = 6 * 28.8e9 (the paper's convention), 1e12 tokens, device D
(989 TFLOPS, 27.5 RMB/h) at MFU 0.21: hours = 1.728e23 / (0.21 * 989e12) / 3600 = 231,100 and
cost = 6.36M RMB, the report's "about 6.35M RMB".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe_plugin.accelerators.catalog import DeviceSpec


@dataclass(frozen=True)
class CostEstimate:
    device: str
    tokens: float
    flops_per_token: float
    mfu: float
    tokens_per_s_per_device: float
    device_hours: float
    price_per_hour: float
    currency: str
    cost: float
    cost_per_million_tokens: float
    mode: str  # "assumed-mfu" | "measured"

    def wall_clock_days(self, num_devices: int) -> float:
        return self.device_hours / num_devices / 24.0

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value} must be > 0.")


def estimate_cost(
    spec: DeviceSpec,
    flops_per_token: float,
    tokens: float,
    mfu: float | None = None,
    tokens_per_s_per_device: float | None = None,
    currency: str | None = None,
    rates: dict[str, float] | None = None,
) -> CostEstimate:
    """Device-hours and cost of `tokens` on `spec`, from an assumed MFU or a measured throughput."""
    _check_positive("tokens", tokens)
    _check_positive("flops_per_token", flops_per_token)
    if (mfu is None) == (tokens_per_s_per_device is None):
        raise ValueError("give exactly one of mfu=<fraction of peak> or throughput=<tokens/s per device>.")
    peak = spec.peak_flops
    if mfu is not None:
        if not 0 < mfu <= 1:
            raise ValueError(f"mfu={mfu} must be a fraction in (0, 1], e.g. mfu=0.21 for 21%.")
        tps = mfu * peak / flops_per_token
        mode = "assumed-mfu"
    else:
        assert tokens_per_s_per_device is not None
        _check_positive("throughput", tokens_per_s_per_device)
        tps = tokens_per_s_per_device
        mfu = tps * flops_per_token / peak
        mode = "measured"
    currency = currency or spec.currency
    price = spec.price_in(currency, rates)
    hours = tokens / tps / 3600.0
    cost = hours * price
    return CostEstimate(
        device=spec.name,
        tokens=float(tokens),
        flops_per_token=float(flops_per_token),
        mfu=float(mfu),
        tokens_per_s_per_device=float(tps),
        device_hours=hours,
        price_per_hour=price,
        currency=currency,
        cost=cost,
        cost_per_million_tokens=cost / tokens * 1e6,
        mode=mode,
    )


def rank_devices(
    specs: list[DeviceSpec],
    flops_per_token: float,
    tokens: float,
    mfu: float,
    currency: str,
    measured: dict[str, float] | None = None,
    rates: dict[str, float] | None = None,
) -> list[CostEstimate]:
    """Cost of the same token budget on each device, cheapest first.

    `measured` maps device name -> tokens/s per device from a real run; those devices use it, the
    others use the assumed `mfu`. Devices without a peak figure or a price are skipped by the caller.
    """
    measured = measured or {}
    out = []
    for spec in specs:
        if spec.name in measured:
            est = estimate_cost(
                spec,
                flops_per_token,
                tokens,
                tokens_per_s_per_device=measured[spec.name],
                currency=currency,
                rates=rates,
            )
        else:
            est = estimate_cost(spec, flops_per_token, tokens, mfu=mfu, currency=currency, rates=rates)
        out.append(est)
    return sorted(out, key=lambda e: e.cost)


def mfu_from_throughput(tokens_per_s_per_device: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    return tokens_per_s_per_device * flops_per_token / peak_flops
