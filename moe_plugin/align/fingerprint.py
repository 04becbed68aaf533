"""Tensor fingerprints: a few numbers that identify a tensor well enough to compare two runs.

A fingerprint of tensor t (computed in float64 on the host):
    numel, norm = ||t||_2, max_abs = max |t|, mean, nonfinite = #(nan or inf),
    samples = t.flatten()[idx], idx_i = (i * 2654435761) mod numel for i < k
The sample positions depend only on numel (Knuth's multiplicative hash), so two machines sample the
same elements without sharing a random generator, and the positions spread over the whole tensor.

Errors between fingerprints a (reference) and b:
    max_abs  = max_i |a.samples_i - b.samples_i|
    max_rel  = max_abs / max(max_i |a.samples_i|, tiny)     (relative to the tensor's own scale)
    norm_rel = |a.norm - b.norm| / max(a.norm, tiny)
Scale-relative error (not elementwise relative) is used because near-zero elements would make an
elementwise ratio meaningless.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

NUM_SAMPLES = 32
_HASH = 2654435761
_TINY = 1e-30


@dataclass
class Fingerprint:
    numel: int
    dtype: str
    norm: float
    max_abs: float
    mean: float
    nonfinite: int
    samples: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Fingerprint:
        return cls(**data)  # type: ignore[arg-type]


def sample_indices(numel: int, k: int = NUM_SAMPLES) -> torch.Tensor:
    if numel <= k:
        return torch.arange(numel)
    return (torch.arange(k, dtype=torch.int64) * _HASH) % numel


@torch.no_grad()
def fingerprint(t: torch.Tensor, k: int = NUM_SAMPLES) -> Fingerprint:
    flat = t.detach().reshape(-1).to("cpu", torch.float64)
    finite = torch.isfinite(flat)
    nonfinite = int((~finite).sum())
    clean = torch.where(finite, flat, torch.zeros_like(flat))
    return Fingerprint(
        numel=flat.numel(),
        dtype=str(t.dtype).replace("torch.", ""),
        norm=float(clean.norm()) if flat.numel() else 0.0,
        max_abs=float(clean.abs().max()) if flat.numel() else 0.0,
        mean=float(clean.mean()) if flat.numel() else 0.0,
        nonfinite=nonfinite,
        samples=flat[sample_indices(flat.numel(), k)].tolist(),
    )


@dataclass(frozen=True)
class FingerprintError:
    max_abs: float
    max_rel: float
    norm_rel: float
    comparable: bool = True  # False when the tensors differ in size (a layout-dependent point)

    @property
    def worst_rel(self) -> float:
        return max(self.max_rel, self.norm_rel)


def compare_fingerprints(a: Fingerprint, b: Fingerprint) -> FingerprintError:
    """Errors of b against the reference a (see the module docstring)."""
    if a.numel != b.numel:
        return FingerprintError(float("nan"), float("nan"), float("nan"), comparable=False)
    if a.nonfinite != b.nonfinite:
        return FingerprintError(float("inf"), float("inf"), float("inf"))
    diffs = [abs(x - y) for x, y in zip(a.samples, b.samples)]
    max_abs = max(diffs, default=0.0)
    scale = max((abs(x) for x in a.samples), default=0.0)
    if max_abs != max_abs:  # nan in a sample on one side only
        return FingerprintError(float("inf"), float("inf"), float("inf"))
    return FingerprintError(
        max_abs=max_abs,
        max_rel=max_abs / max(scale, _TINY) if max_abs > 0 else 0.0,
        norm_rel=abs(a.norm - b.norm) / max(a.norm, _TINY) if a.norm != b.norm else 0.0,
    )
