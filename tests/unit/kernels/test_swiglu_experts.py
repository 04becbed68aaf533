"""The fused SwiGLU experts node (one autograd node, per-expert GEMMs, hand-written backward) against the
obvious per-expert loop: outputs and every gradient, including experts without rows, no rows at all,
a second backward with retain_graph, no-grad inference and autocast; each for the Python loop and the compiled
CPU kernel (native=True, kernels/native.py)."""

from __future__ import annotations

import pytest
import torch

from moe_plugin.kernels.native import native_ops
from moe_plugin.kernels.swiglu_experts import swiglu_experts
from moe_plugin.layers.experts import experts_loop

# The compiled kernel is part of the CPU path: where it cannot be built, these tests say so by failing.
IMPLS = pytest.mark.parametrize("native", [False, True], ids=["python", "native"])


@pytest.fixture(scope="module", autouse=True)
def _native_built():
    assert native_ops() is not None, "the compiled CPU kernels did not build (see the warning)"


def _problem(counts: list[int], D: int = 16, F: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    E = len(counts)
    x = torch.randn(sum(counts), D, generator=gen, requires_grad=True)
    ws = [
        (torch.randn(E, D, F, generator=gen) / 4).requires_grad_(),
        (torch.randn(E, D, F, generator=gen) / 4).requires_grad_(),
        (torch.randn(E, F, D, generator=gen) / 4).requires_grad_(),
    ]
    return x, ws


def _run(fn, x, ws, grad_y):
    for t in [x, *ws]:
        t.grad = None
    y = fn()
    (y * grad_y).sum().backward()
    return y.detach(), [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in [x, *ws]]


@IMPLS
@pytest.mark.parametrize("counts", [[3, 5, 2], [0, 7, 0, 4], [9], [0, 0, 6], [40, 1, 0, 23, 17]])
def test_matches_loop_reference_outputs_and_grads(counts, native):
    x, ws = _problem(counts)
    grad_y = torch.randn(sum(counts), 16)
    c = torch.tensor(counts)
    y, grads = _run(lambda: swiglu_experts(x, *ws, c, native=native), x, ws, grad_y)
    y_ref, grads_ref = _run(lambda: experts_loop(x, c, *ws), x, ws, grad_y)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down"), grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for e, n in enumerate(counts):  # an expert without rows gets an exact zero gradient, not garbage
        if n == 0:
            assert all(torch.count_nonzero(g[e]) == 0 for g in grads[1:])


@IMPLS
def test_no_rows_and_host_counts(native):
    x, ws = _problem([0, 0, 0])
    y = swiglu_experts(x, *ws, [0, 0, 0], native=native)
    assert y.shape == (0, 16)
    (y.sum() + 0.0 * ws[0].sum()).backward()
    assert all(w.grad is None or torch.count_nonzero(w.grad) == 0 for w in ws)
    with pytest.raises(ValueError, match="sum to the 0 rows"):
        swiglu_experts(x, *ws, [1, 0, 0], native=native)


@IMPLS
def test_retain_graph_second_backward_gives_same_grads(native):
    x, ws = _problem([4, 6])
    y = swiglu_experts(x, *ws, [4, 6], native=native)
    g = torch.randn_like(y)
    y.backward(g, retain_graph=True)
    first = [t.grad.clone() for t in [x, *ws]]
    for t in [x, *ws]:
        t.grad = None
    y.backward(g)  # saved tensors must be intact
    for a, t in zip(first, [x, *ws]):
        torch.testing.assert_close(a, t.grad)


@IMPLS
def test_inference_and_autocast(native):
    x, ws = _problem([5, 3, 8])
    c = [5, 3, 8]
    with torch.no_grad():
        y = swiglu_experts(x, *ws, c, native=native)
        ref = experts_loop(x, torch.tensor(c), *ws)
    assert not y.requires_grad
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = swiglu_experts(x, *ws, c, native=native)
        ref16 = experts_loop(x, torch.tensor(c), *ws)
    assert y16.dtype == ref16.dtype == torch.bfloat16  # computes in the autocast dtype, as `@` does
    torch.testing.assert_close(y16.float(), ref.float(), atol=0.1, rtol=0.05)
    y16.float().sum().backward()
    assert ws[0].grad is not None and ws[0].grad.dtype == torch.float32
