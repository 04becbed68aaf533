"""Dropless gather and combine (kernels/token_rows.py) against the obvious torch forms: index_select with its
autograd backward, and permute.unpermute_reference; 1-3 threads, bf16."""

from __future__ import annotations

import pytest
import torch

from moe_plugin.kernels import token_rows
from moe_plugin.layers.permute import sort_by_expert, unpermute_reference


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _routing(T=300, K=3, E=7, D=40, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    probs = torch.rand(T, K, generator=gen, dtype=dtype).requires_grad_()
    x = torch.randn(T, D, generator=gen, dtype=dtype).requires_grad_()
    return x, probs, sort_by_expert(ids, E).state


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_gather_matches_index_select(threads, num_threads):
    threads(num_threads)
    x, _, st = _routing()
    y = token_rows.dropless_gather(x, st.token_idx_N, st.positions_TK())
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    y_ref = x.index_select(0, st.token_idx_N)
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_combine_matches_reference(threads, num_threads):
    threads(num_threads)
    x, probs, st = _routing()
    y = torch.randn(st.order_N.numel(), x.shape[1], generator=torch.Generator().manual_seed(3)).requires_grad_()
    out = token_rows.dropless_combine(y, probs, st.order_N, st.positions_TK())
    ref = unpermute_reference(y, probs, st)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (y, probs), g)
    want = torch.autograd.grad(ref, (y, probs), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    (dy_only,) = torch.autograd.grad(
        token_rows.dropless_combine(y, probs.detach(), st.order_N, st.positions_TK()), y, g
    )
    torch.testing.assert_close(dy_only, got[0])


def test_bfloat16():
    x, probs, st = _routing(dtype=torch.bfloat16)
    y = torch.randn(st.order_N.numel(), x.shape[1]).bfloat16().requires_grad_()
    out = token_rows.dropless_combine(y, probs, st.order_N, st.positions_TK())
    ref = unpermute_reference(y.float(), probs.float(), st)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert y.grad.dtype == torch.bfloat16 and probs.grad.dtype == torch.bfloat16
