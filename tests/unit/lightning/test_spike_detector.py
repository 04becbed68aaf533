"""EWMA z-score detector against a slow reference with explicit weights."""

from __future__ import annotations

import math
import random

import pytest

from moe_plugin.lightning.callbacks.spike_detector import EWMAZScore


def reference(xs: list[float], alpha: float) -> tuple[float, float]:
    """Weighted mean/variance with the weights the recursion implies: w_i = a_i * prod_{j>i} (1 - a_j)."""
    a = [max(alpha, 1.0 / (i + 1)) for i in range(len(xs))]
    w = [a[i] * math.prod(1 - a[j] for j in range(i + 1, len(xs))) for i in range(len(xs))]
    mean = sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    var = sum(wi * (x - mean) ** 2 for wi, x in zip(w, xs)) / sum(w)
    return mean, var


@pytest.mark.parametrize("alpha", [0.02, 0.3])
def test_matches_weighted_reference(alpha):
    rng = random.Random(0)
    xs = [3.0 + rng.gauss(0, 0.1) for _ in range(200)]
    d = EWMAZScore(alpha=alpha)
    for x in xs:
        d.update(x)
    mean, var = reference(xs, alpha)
    assert d.mean == pytest.approx(mean, rel=1e-9)
    # the recursion is exact for the mean; the variance is the standard incremental approximation
    assert d.var == pytest.approx(var, rel=0.1)


def test_first_values_are_averaged_evenly():
    d = EWMAZScore()
    for x in (1.0, 2.0, 3.0):
        d.update(x)
    assert d.mean == pytest.approx(2.0) and d.var == pytest.approx(2.0 / 3.0)


def test_warmup_threshold_and_non_finite():
    d = EWMAZScore(alpha=0.02, warmup_steps=10, threshold=3.0)
    rng = random.Random(1)
    for _ in range(9):
        d.update(2.0 + rng.gauss(0, 0.05))
    assert not d.is_spike(100.0)  # not warmed up
    d.update(2.0)
    assert d.is_spike(100.0) and not d.is_spike(2.05) and not d.is_spike(-100.0)  # one-sided
    assert d.is_spike(float("nan")) and d.zscore(float("inf")) == math.inf
    with pytest.raises(ValueError, match="non-finite"):
        d.update(float("nan"))


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="alpha=0"):
        EWMAZScore(alpha=0)
    with pytest.raises(ValueError, match="warmup_steps=0"):
        EWMAZScore(warmup_steps=0)
    with pytest.raises(ValueError, match="threshold=-1"):
        EWMAZScore(threshold=-1)


def test_state_round_trip():
    d = EWMAZScore()
    for x in (1.0, 1.5, 1.2):
        d.update(x)
    e = EWMAZScore()
    e.load_state_dict(d.state_dict())
    assert (e.mean, e.var, e.count) == (d.mean, d.var, d.count)
