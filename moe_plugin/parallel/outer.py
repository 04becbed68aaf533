"""The outer step of local SGD (EDiT, arXiv 2412.07210; DiLoCo, arXiv 2311.08105): pseudo-gradients,
their screening and averaging over islands, and the outer Nesterov optimizer.

Vocabulary: K islands, theta_s the weights at the last synchronisation (identical on every island), theta_k
island k's weights after its H_k local steps, mu momentum, eta the outer learning rate.

    Delta_k = theta_s - theta_k                                       pseudo-gradient of island k
    n_k     = ||Delta_k||_2                                           over the WHOLE model (every expert once)
    r_k     = n_k * Hbar / H_k,   Hbar = mean_j H_j                   the step-normalised norm (per_step=True)
    screening (EDiT's pseudo-gradient penalty), per island k with its own EWMA z-score detector:
        rejected_k = not finite(n_k)  or  (detector warmed up and z_k = (r_k - m_k) / s_k > threshold)
    weights over accepted islands A:
        softmax:  w_k = exp(-r_k / T) / sum_{j in A} exp(-r_j / T)     (T = 1, EDiT)
        uniform:  w_k = 1 / |A|          steps:  w_k = H_k / sum_{j in A} H_j

Why r_k and not n_k: EDiT's screen is about ANOMALOUS movement. With time-based rounds (A-EDiT) island k takes
H_k local steps, and its norm grows with H_k (about linearly while the steps agree in direction), so on the raw
norm a fast island looks anomalous and softmax(-n/T) starves it: measured in bench/islands.py (docs/
performance.md), softmax on n_k gave the 3x faster island a weight of ~0.05 and ended 8% worse. r_k compares
islands at the same step count (the mean one); when every H_k is equal (step-based rounds) r_k = n_k exactly,
which is EDiT's rule unchanged. per_step=False screens the raw n_k.
    clipping: c_k = min(1, clip_norm / n_k)                          (clip_norm = None: c_k = 1)
    Delta   = sum_{k in A} w_k c_k Delta_k                            one all-reduce over the outer group
    outer Nesterov SGD (torch.optim.SGD(nesterov=True)'s rule):
        b <- mu b + Delta;   theta_s <- theta_s - eta (Delta + mu b)       (mu = 0: theta_s - eta Delta)
    every island continues from theta_s; inner optimizer state (AdamW moments) is never averaged.

With eta = 1, mu = 0 and uniform weights, theta_s becomes the mean of the islands' weights: after one local
step of a linear optimizer (SGD), exactly synchronous data parallelism.

Experts are exchanged by GLOBAL id: each tensor is laid into its global shape ([E, ...] for stacked experts,
the rows [start, stop) a rank holds), so islands may shard experts differently (different EP sizes). Only one
replica of each value contributes (the rank that "owns" it in its island); the others add zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

WEIGHTINGS = ("softmax", "uniform", "steps")


class Detector(Protocol):
    """An anomaly detector on a stream of floats (lightning/callbacks/spike_detector.EWMAZScore fits)."""

    def zscore(self, x: float) -> float: ...
    def is_spike(self, x: float) -> bool: ...
    def update(self, x: float) -> None: ...


@dataclass(frozen=True)
class Slot:
    """One tensor of the exchange: its global shape and the rows [start, stop) of dim 0 this rank holds."""

    name: str
    global_shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)


def make_slots(named: Sequence[tuple[str, torch.Tensor]], expert_params: dict[str, tuple[int, int, int]]) -> list[Slot]:
    """Slots for `named` local tensors; `expert_params[name] = (E, start, stop)` marks stacked expert tensors."""
    slots = []
    for name, t in named:
        if name in expert_params:
            E, start, stop = expert_params[name]
            slots.append(Slot(name, (E, *t.shape[1:]), start, stop))
        else:
            slots.append(Slot(name, tuple(t.shape), 0, t.shape[0] if t.dim() else 1))
    return slots


@torch.no_grad()
def global_weighted_sum(
    slots: Sequence[Slot],
    local: Sequence[torch.Tensor | Callable[[], torch.Tensor]],
    factor: float | Sequence[float],
    group: dist.ProcessGroup | None,
    device: torch.device | str = "cpu",
    bucket_numel: int = 1 << 24,
    consume: Callable[[int, torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """sum over the ranks r of `group` of factor_r * local_r, laid out globally, sliced back to this rank's rows.

    `factor` is one float, or one per slot. A rank passes factor 0 for values it does not own (replicas), so
    each value is counted once per island. A `local` entry may be a zero-argument callable: it is called only
    when its bucket is filled and its factor is not 0, so a pseudo-gradient need not exist for the whole model
    at once. Buckets of at most `bucket_numel` global elements (at least one tensor) bound the extra memory.
    Returns float32 tensors on `device` shaped like this rank's rows; with `consume`, each result is handed to
    `consume(slot_index, tensor)` as soon as its bucket is reduced instead (and [] is returned), so the extra
    memory of a whole exchange stays one bucket plus one tensor.
    """
    factors = [float(factor)] * len(slots) if isinstance(factor, (int, float)) else [float(f) for f in factor]
    out: list[torch.Tensor] = []
    i = 0
    while i < len(slots):
        j, total = i, 0
        while j < len(slots) and (j == i or total + slots[j].global_numel <= bucket_numel):
            total += slots[j].global_numel
            j += 1
        flat = torch.zeros(total, dtype=torch.float32, device=device)
        views, offset = [], 0
        for s, t, f in zip(slots[i:j], local[i:j], factors[i:j]):
            view = flat[offset : offset + s.global_numel].view(s.global_shape)
            if f != 0.0:
                rows = view if not s.global_shape else view[s.start : s.stop]
                t = t() if callable(t) else t
                rows.copy_(t.detach().to(device=device, dtype=torch.float32).reshape(rows.shape)).mul_(f)
            views.append(view)
            offset += s.global_numel
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for k, (s, view) in enumerate(zip(slots[i:j], views)):
            rows = view if not s.global_shape else view[s.start : s.stop]
            result = rows.reshape(s.stop - s.start, *s.global_shape[1:]) if s.global_shape else rows.reshape(())
            if consume is not None:
                consume(i + k, result)
            else:
                out.append(result.clone())
        i = j
    return out


def sum_over_group(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-reduce SUM of a small float64 vector (the per-island statistics of one synchronisation)."""
    out = values.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_gather_objects(obj: object, group: dist.ProcessGroup | None) -> list[object]:
    """Every rank's `obj` (picklable), in rank order; used rarely (agreeing on a checkpoint path)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


@dataclass
class Screening:
    """The outcome of screening one synchronisation's pseudo-gradients, one entry per island."""

    norms: list[float]
    zscores: list[float]
    accepted: list[bool]
    weights: list[float]  # w_k (0 for rejected islands); sums to 1 over accepted ones
    clip_coefs: list[float]  # c_k
    factors: list[float] = field(default_factory=list)  # w_k * c_k: island k's multiplier in the average
    scored: list[float] = field(default_factory=list)  # what the detector and softmax saw (r_k, or n_k)

    @property
    def any_accepted(self) -> bool:
        return any(self.accepted)


def screen(
    norms: Sequence[float],
    steps: Sequence[float],
    detectors: Sequence[Detector] | None,
    weighting: str = "softmax",
    temperature: float = 1.0,
    clip_norm: float | None = None,
    per_step: bool = True,
) -> Screening:
    """Reject anomalous islands, weight and clip the others (module docstring). The detector and the softmax
    see the step-normalised norms r_k (per_step=True) or the raw n_k; clipping always acts on n_k (it bounds
    the update). Updates the detectors with the accepted values only (a rejected one folded in would widen the
    band and hide the next anomaly)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"strategy.weighting={weighting!r} must be one of {WEIGHTINGS}.")
    K = len(norms)
    scored = step_normalised(norms, steps) if per_step else list(norms)
    z = [0.0] * K
    accepted = [math.isfinite(n) for n in norms]
    if detectors is not None:
        for k in range(K):
            z[k] = detectors[k].zscore(scored[k])
            if detectors[k].is_spike(scored[k]):
                accepted[k] = False
            else:
                detectors[k].update(scored[k])
    idx = [k for k in range(K) if accepted[k]]
    weights = [0.0] * K
    if idx:
        if weighting == "softmax":
            lo = min(scored[k] for k in idx)  # shift for stability: softmax is shift-invariant
            e = {k: math.exp(-(scored[k] - lo) / temperature) for k in idx}
        elif weighting == "steps":
            e = {k: float(steps[k]) for k in idx}
        else:
            e = {k: 1.0 for k in idx}
        total = sum(e.values())
        for k in idx:
            weights[k] = e[k] / total
    coefs = [min(1.0, clip_norm / n) if clip_norm is not None and math.isfinite(n) and n > 0 else 1.0 for n in norms]
    factors = [weights[k] * coefs[k] for k in range(K)]
    return Screening(list(norms), z, accepted, weights, coefs, factors, scored)


def step_normalised(norms: Sequence[float], steps: Sequence[float]) -> list[float]:
    """r_k = n_k * Hbar / H_k with Hbar the mean of H over the islands that took steps (module docstring);
    an island that took none keeps n_k (its pseudo-gradient is zero: it only reports a stop)."""
    H = [float(h) for h in steps]
    moved = [h for h in H if h > 0]
    mean = sum(moved) / len(moved) if moved else 0.0
    return [n * mean / h if h > 0 else n for n, h in zip(norms, H)]


@torch.no_grad()
def outer_sgd_step(
    synced: Sequence[torch.Tensor],
    pseudo_grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    lr: float,
    momentum: float,
    nesterov: bool = True,
) -> None:
    """In place: b <- mu b + g;  theta <- theta - lr (g + mu b) (nesterov) or theta - lr b (heavy ball).

    Buffers start at zero, which gives torch.optim.SGD's first step (b = g) exactly.
    """
    for theta, g, b in zip(synced, pseudo_grads, momentum_buffers):
        if momentum == 0.0:
            theta.sub_(g, alpha=lr)
            continue
        b.mul_(momentum).add_(g)
        theta.sub_(g.add(b, alpha=momentum) if nesterov else b, alpha=lr)
