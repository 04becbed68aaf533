"""EWMA z-score detector for loss spikes (pure Python: no torch, no Lightning).

For each new observation x_t (the training loss, or the log of the gradient norm):

    z_t     = (x_t - m_{t-1}) / sqrt(v_{t-1} + eps)          scored against the statistics BEFORE x_t
    spike_t = (n >= warmup_steps) and (z_t > threshold)       one-sided: only upward jumps are spikes

and only accepted observations (not spikes) update the exponentially weighted mean and variance
(incremental form, T. Finch, "Incremental calculation of weighted mean and variance", 2009):

    d = x_t - m;   m <- m + a * d;   v <- (1 - a) * (v + a * d^2)

with a = max(alpha, 1 / n) so the first observations are averaged evenly instead of the first value
dominating for ~1/alpha steps. Defaults alpha = 0.02, warm-up 120, threshold 3 follow Ant Group's EDiT code
(see ../shared/PAPER.md section 3: the Ling report does not state its rule).

Keeping spikes out of the statistics matters: a spike folded into m and v would widen the band and hide the
retry's spike, which is exactly the case that must lower the learning rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class EWMAZScore:
    alpha: float = 0.02
    warmup_steps: int = 120
    threshold: float = 3.0
    eps: float = 1e-12
    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in (0, 1], e.g. 0.02.")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 1 (the detector needs a baseline).")
        if self.threshold <= 0:
            raise ValueError(f"threshold={self.threshold} must be positive, e.g. 3.0.")

    @property
    def warmed_up(self) -> bool:
        return self.count >= self.warmup_steps

    def zscore(self, x: float) -> float:
        """z of `x` against the current statistics (0 before any observation, +inf for non-finite x)."""
        if not math.isfinite(x):
            return math.inf
        if self.count == 0:
            return 0.0
        return (x - self.mean) / math.sqrt(self.var + self.eps)

    def is_spike(self, x: float) -> bool:
        """True if `x` is non-finite, or the detector is warmed up and z(x) exceeds the threshold."""
        if not math.isfinite(x):
            return True
        return self.warmed_up and self.zscore(x) > self.threshold

    def update(self, x: float) -> None:
        """Fold an accepted observation into the running mean and variance."""
        if not math.isfinite(x):
            raise ValueError(f"cannot update the detector with a non-finite value {x}.")
        self.count += 1
        a = max(self.alpha, 1.0 / self.count)
        d = x - self.mean
        self.mean += a * d
        self.var = (1.0 - a) * (self.var + a * d * d)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("mean", "var", "count"):
            setattr(self, key, type(getattr(self, key))(state[key]))
