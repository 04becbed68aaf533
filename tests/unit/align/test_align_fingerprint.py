"""Fingerprints and their comparison."""

from __future__ import annotations

import math

import torch

from moe_plugin.align.fingerprint import NUM_SAMPLES, compare_fingerprints, fingerprint, sample_indices


def test_fingerprint_matches_direct_computation() -> None:
    t = torch.randn(7, 300, generator=torch.Generator().manual_seed(0))
    fp = fingerprint(t)
    flat = t.double().reshape(-1)
    assert fp.numel == 2100 and fp.dtype == "float32"
    assert fp.norm == float(flat.norm()) and fp.max_abs == float(flat.abs().max())
    assert fp.samples == flat[sample_indices(2100)].tolist()
    assert len(fp.samples) == NUM_SAMPLES and fp.nonfinite == 0


def test_sample_positions_depend_only_on_size_and_spread() -> None:
    idx = sample_indices(10_000)
    assert torch.equal(idx, sample_indices(10_000))
    assert int(idx.min()) >= 0 and int(idx.max()) < 10_000 and len(set(idx.tolist())) == NUM_SAMPLES
    assert int(idx.max()) - int(idx.min()) > 5_000  # not bunched at the start
    assert sample_indices(5).tolist() == [0, 1, 2, 3, 4]


def test_errors_are_scale_relative() -> None:
    a = torch.linspace(-2.0, 2.0, 4096)
    b = a.clone()
    b[sample_indices(4096)[3]] += 0.01  # perturb one sampled element
    err = compare_fingerprints(fingerprint(a), fingerprint(b))
    assert err.max_abs == pytest_approx(0.01)
    scale = float(a[sample_indices(4096)].abs().max())
    assert err.max_rel == pytest_approx(0.01 / scale)
    same = compare_fingerprints(fingerprint(a), fingerprint(a.clone()))
    assert same.max_abs == 0 and same.worst_rel == 0


def test_nonfinite_and_size_mismatch() -> None:
    a = torch.ones(100)
    b = a.clone()
    b[0] = float("nan")
    assert fingerprint(b).nonfinite == 1
    assert math.isinf(compare_fingerprints(fingerprint(a), fingerprint(b)).worst_rel)
    assert not compare_fingerprints(fingerprint(a), fingerprint(torch.ones(50))).comparable


def pytest_approx(x: float):  # type: ignore[no-untyped-def]
    import pytest

    return pytest.approx(x, rel=1e-6)
