"""The compiled CPU kernels (kernels/csrc/swiglu_experts.cpp, built by kernels/native.py).

What the Python-loop tests cannot see: rows cut between threads (an expert whose weight gradient is summed
from two threads' shares), experts longer than one row block, thread counts 1-3, float64 gradcheck, and the
build itself: cache reuse, a failing compiler, no compiler, the off switch, and the `native` backend's errors.
"""

from __future__ import annotations

import os

import pytest
import torch

from moe_plugin.kernels import native
from moe_plugin.kernels.grouped_mm import grouped_mm_choice
from moe_plugin.kernels.swiglu_experts import NATIVE_BLOCK_ROWS, swiglu_experts
from moe_plugin.layers.experts import GroupedExperts, experts_loop


@pytest.fixture(scope="module")
def ops():
    ops = native.native_ops()
    assert ops is not None, native.native_status()
    return ops


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _problem(counts, D=32, F=48, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E = len(counts)
    x = torch.randn(sum(counts), D, generator=gen, dtype=dtype).requires_grad_()
    ws = [
        (torch.randn(E, D, F, generator=gen, dtype=dtype) / 5).requires_grad_(),
        (torch.randn(E, D, F, generator=gen, dtype=dtype) / 5).requires_grad_(),
        (torch.randn(E, F, D, generator=gen, dtype=dtype) / 5).requires_grad_(),
    ]
    return x, ws


def _grads(fn, x, ws, dy):
    for t in [x, *ws]:
        t.grad = None
    y = fn()
    y.backward(dy)
    return [y.detach()] + [t.grad.clone() for t in [x, *ws]]


# Row counts chosen so that thread borders fall inside experts (2 and 3 threads), an expert spans several
# row blocks (NATIVE_BLOCK_ROWS), and some experts are empty, first and last included.
CASES = {
    "borders_inside_experts": [150, 70, 0, 211, 33],
    "one_hot_expert_over_blocks": [0, 2 * NATIVE_BLOCK_ROWS + 77, 5, 0],
    "single_expert": [301],
    "many_small": [7, 0, 3, 9, 1, 0, 12, 64, 2, 5, 0, 8],
}


@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_at_every_thread_count(ops, threads, case, num_threads):
    threads(num_threads)
    counts = CASES[case]
    x, ws = _problem(counts)
    dy = torch.randn(sum(counts), 32, generator=torch.Generator().manual_seed(1))
    got = _grads(lambda: swiglu_experts(x, *ws, counts, native=True), x, ws, dy)
    ref = _grads(lambda: experts_loop(x, torch.tensor(counts), *ws), x, ws, dy)
    # float32 sums over up to 2,000 rows in another order (threads, blocks): 1e-4 of values of order 1-10
    for name, a, b in zip(("y", "x", "w_gate", "w_up", "w_down"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for e, n in enumerate(counts):
        if n == 0:  # written as exact zeros, not left uninitialised
            assert all(torch.count_nonzero(g[e]) == 0 for g in got[2:])


def test_gradcheck_float64(ops, threads):
    threads(2)
    counts = [40, 0, 90, 1]  # 131 rows: two parts of at least 64 rows, a border inside expert 2
    x, ws = _problem(counts, D=6, F=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: swiglu_experts(*t, counts, native=True), (x, *ws), eps=1e-6)


def test_bfloat16_close_to_float32(ops):
    counts = [100, 0, 156]
    x, ws = _problem(counts)
    y32 = swiglu_experts(x, *ws, counts, native=True)
    y16 = swiglu_experts(x.bfloat16(), *(w.bfloat16() for w in ws), counts, native=True)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32.detach(), atol=0.05, rtol=0.05)


def test_only_some_inputs_need_grad(ops):
    counts = [20, 30]
    x, ws = _problem(counts)
    ws[1].requires_grad_(False)
    y = swiglu_experts(x.detach(), *ws, counts, native=True)
    y.sum().backward()
    assert ws[1].grad is None and ws[0].grad is not None and ws[2].grad is not None


def test_op_checks_its_inputs(ops):
    x, ws = _problem([3, 4])
    with pytest.raises(RuntimeError, match="counts must sum"):
        ops.swiglu_experts_forward(x.detach(), *(w.detach() for w in ws), [3, 3], 1024, 64)
    with pytest.raises(RuntimeError, match="one count per expert"):
        ops.swiglu_experts_forward(x.detach(), *(w.detach() for w in ws), [7], 1024, 64)


def test_layer_auto_takes_native_on_cpu_and_mm_matches_it(ops):
    assert grouped_mm_choice("auto", "cpu", torch.float32) == "native"
    assert grouped_mm_choice("auto", "cpu") == "mm"  # the planner's view: nothing is built
    counts = torch.tensor([30, 0, 50])
    outs = []
    for backend in ("auto", "mm"):
        layer = GroupedExperts(3, 16, 24, grouped_mm_backend=backend)
        torch.manual_seed(0)
        layer.reset_parameters()
        x = torch.randn(80, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
        y = layer(x, counts)
        y.square().sum().backward()
        outs.append([y.detach(), x.grad, layer.w_gate_EDF.grad, layer.w_down_EFD.grad])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_native_backend_errors_name_the_key():
    with pytest.raises(ValueError, match="model.moe.grouped_mm_backend='native'.*cuda"):
        grouped_mm_choice("native", "cuda", torch.float32)


def test_build_is_cached_and_reused(tmp_path, monkeypatch):
    lib = native.build(cache=tmp_path, quiet=True)
    assert lib.exists() and lib.parent.parent == tmp_path
    mtime = lib.stat().st_mtime_ns
    assert native.build(cache=tmp_path, quiet=True) == lib and lib.stat().st_mtime_ns == mtime
    assert not list(lib.parent.glob("*.tmp"))  # the temporary library was renamed, nothing half written


def test_failing_compiler_gives_a_clear_error_and_a_log(tmp_path, monkeypatch):
    script = tmp_path / "bad-c++"
    script.write_text("#!/bin/sh\necho 'fatal: out of cheese' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    with pytest.raises(native.NativeKernelError, match="MOE_PLUGIN_NATIVE_KERNELS=0") as err:
        native.build(cache=tmp_path / "cache", quiet=True)
    log = next((tmp_path / "cache").glob("*/build.log"))
    assert "out of cheese" in log.read_text() and str(log) in str(err.value)
    assert not list((tmp_path / "cache").glob("*/*.so*"))


def test_no_compiler_on_path(tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(native.NativeKernelError, match="no C\\+\\+ compiler"):
        native.build(cache=tmp_path, quiet=True)


def test_off_switch_falls_back_and_native_backend_refuses(monkeypatch):
    native._load.cache_clear()
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    try:
        assert native.native_ops() is None and "disabled" in native.native_status()
        assert grouped_mm_choice("auto", "cpu", torch.float32) == "mm"
        with pytest.raises(ValueError, match="grouped_mm_backend='native'.*disabled.*'auto' or 'mm'"):
            grouped_mm_choice("native", "cpu", torch.float32)
        counts = [5, 7]
        x, ws = _problem(counts)
        y = swiglu_experts(x, *ws, counts, native=True)  # asked for, not available: the Python path serves
        torch.testing.assert_close(y, experts_loop(x, torch.tensor(counts), *ws), atol=1e-5, rtol=1e-5)
    finally:
        monkeypatch.delenv(native.DISABLE_ENV)
        native._load.cache_clear()
    assert native.native_ops() is not None


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "k"))
    assert native.cache_root() == tmp_path / "k"
    monkeypatch.delenv(native.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_root() == tmp_path / "moe_plugin" / "kernels"
    assert os.path.isabs(native.cache_root())


def test_status_without_building_reports_a_missing_library(tmp_path, monkeypatch):
    session_cache = native.cache_root()
    native._load.cache_clear()
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    try:
        status = native.native_status(build_now=False)
        assert status.startswith("not built yet") and str(tmp_path) in status
        assert not list(tmp_path.iterdir())  # nothing was compiled or created
    finally:
        monkeypatch.setenv(native.CACHE_ENV, str(session_cache))
        native._load.cache_clear()
    assert native.native_ops() is not None
