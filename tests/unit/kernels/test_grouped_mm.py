"""The grouped-matmul seam: torch._grouped_mm and the loop fallback agree on outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from moe_plugin.kernels import (
    grouped_mm_backend_name,
    grouped_mm_loop,
    grouped_mm_mm,
    grouped_mm_torch,
    select_grouped_mm,
)


def _problem(counts: list[int], I: int = 16, O: int = 24, seed: int = 0):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), I, generator=gen, requires_grad=True)
    w = torch.randn(len(counts), I, O, generator=gen, requires_grad=True)
    return x, w, torch.tensor(counts)


def _per_row_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Most obvious form: each row times its own expert's matrix."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return torch.einsum("ni,nio->no", x, w[expert_of_row])


@pytest.mark.parametrize("counts", [[3, 5, 2], [0, 7, 0, 4], [9], [0, 0, 6]])
@pytest.mark.parametrize("impl", [grouped_mm_loop, grouped_mm_torch, grouped_mm_mm])
def test_matches_per_row_reference_outputs_and_grads(counts, impl):
    x, w, c = _problem(counts)
    grad_y = torch.randn(sum(counts), 24)
    y = impl(x, w, c)
    y.backward(grad_y)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_ref = _per_row_reference(x, w, c)
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)


def test_torch_backend_accepts_expanded_incoming_gradient():
    # y.sum().backward() hands grouped_mm an expanded (stride-0) gradient, which its backward rejects
    # unless we make it contiguous first.
    x, w, c = _problem([4, 0, 6])
    grouped_mm_torch(x, w, c).sum().backward()
    gw = w.grad.clone()
    w.grad = None
    _per_row_reference(x, w, c).sum().backward()
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", [grouped_mm_loop, grouped_mm_torch, grouped_mm_mm])
def test_no_rows_gives_empty_output_and_zero_weight_grad(impl):
    x, w, c = _problem([0, 0, 0])
    y = impl(x, w, c)
    assert y.shape == (0, 24)
    (y.sum() + 0.0 * w.sum()).backward()
    assert torch.count_nonzero(w.grad) == 0


def test_loop_rejects_counts_not_covering_rows():
    x, w, _ = _problem([3, 3])
    with pytest.raises(ValueError, match="sums to 5"):
        grouped_mm_loop(x, w, torch.tensor([2, 3]))


def test_selection():
    assert select_grouped_mm("loop") is grouped_mm_loop
    # On CPU the per-expert mm node is faster than torch._grouped_mm's CPU loop (docs/performance.md).
    assert select_grouped_mm("auto", "cpu", torch.float32) is grouped_mm_mm
    assert select_grouped_mm("mm", "meta") is grouped_mm_mm
    assert select_grouped_mm("torch", "cpu", torch.float32) is grouped_mm_torch  # works on CPU in torch 2.13
    assert grouped_mm_backend_name(select_grouped_mm("auto")) == "per-expert mm"
    assert grouped_mm_backend_name(select_grouped_mm("torch")) == "torch._grouped_mm"
    # float64 is not supported by torch._grouped_mm: an explicit request fails clearly.
    with pytest.raises(ValueError, match="grouped_mm_backend='torch'.*float64"):
        select_grouped_mm("torch", "cpu", torch.float64)
    with pytest.raises(ValueError, match="grouped_mm_backend='fast'"):
        select_grouped_mm("fast")


def test_bfloat16_torch_backend_close_to_float32():
    x, w, c = _problem([5, 3, 8])
    y = grouped_mm_torch(x.detach().bfloat16(), w.detach().bfloat16(), c)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _per_row_reference(x, w, c).detach(), atol=0.2, rtol=3e-2)


@pytest.mark.parametrize(("I", "O", "dtype"), [(16, 5, torch.float32), (16, 12, torch.bfloat16)])
def test_torch_backend_handles_unaligned_strides(I, O, dtype):  # noqa: E741
    # torch._grouped_mm wants 16-byte row strides; unaligned shapes must still work (via the loop).
    x, w, c = _problem([2, 4], I=I, O=O)
    y = grouped_mm_torch(x.to(dtype), w.to(dtype), c)
    torch.testing.assert_close(y.float(), _per_row_reference(x, w, c).detach(), atol=0.2, rtol=3e-2)


def test_probe_is_independent_of_grad_mode():
    from moe_plugin.kernels.grouped_mm import _torch_grouped_mm_works

    _torch_grouped_mm_works.cache_clear()
    with torch.no_grad():
        assert _torch_grouped_mm_works("cpu", torch.float32)
    _torch_grouped_mm_works.cache_clear()
    with torch.inference_mode():
        assert _torch_grouped_mm_works("cpu", torch.float32)

    _torch_grouped_mm_works.cache_clear()
    with torch.device("meta"):  # models are built on meta for `moe-plugin inspect`
        assert _torch_grouped_mm_works("cpu", torch.float32)


def test_torch_path_matches_loop_under_autocast_and_probe_survives_it() -> None:
    import torch

    from moe_plugin.kernels import grouped_mm as gm

    gm._torch_grouped_mm_works.cache_clear()
    torch.manual_seed(0)
    x = torch.randn(20, 16, requires_grad=True)
    w = torch.randn(3, 16, 32, requires_grad=True)
    counts = torch.tensor([7, 0, 13])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fn = gm.select_grouped_mm("torch", "cpu", gm.compute_dtype(x))  # probing inside autocast
        y_fast = gm.grouped_mm_torch(x, w, counts)
        y_loop = gm.grouped_mm_loop(x, w, counts)
    assert fn is gm.grouped_mm_torch  # the probe was not poisoned by the caller's autocast
    assert y_fast.dtype == y_loop.dtype == torch.bfloat16
    torch.testing.assert_close(y_fast.float(), y_loop.float(), atol=0.05, rtol=0.02)
