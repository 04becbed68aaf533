"""Grouped matrix multiply: the seam through which routed experts run their GEMMs.

Shapes: N token copies sorted by expert, E experts (local to this rank), I input features,
O output features.

    y_NO[n] = x_NI[n] @ w_EIO[e(n)]      where copy n belongs to expert e(n)

The copies of expert e are the contiguous rows offs[e-1]:offs[e] with offs = cumsum(tokens_per_expert_E).

Implementations, each with the same signature `(x_NI, w_EIO, tokens_per_expert_E) -> y_NO`:
- `grouped_mm_loop`:  sort-and-loop fallback, one `torch.mm` per expert. Runs everywhere, in any dtype.
- `grouped_mm_mm`:    one autograd node, one `torch.mm(..., out=slice)` per expert forward and backward
  (host counts). The CPU default: torch._grouped_mm's CPU loop runs its GEMMs 10-25% slower. The SwiGLU
  experts take this path as one fused node for the whole MLP (kernels/swiglu_experts.py).
- `grouped_mm_torch`: one `torch._grouped_mm` call (a single fused kernel on CUDA sm90+, a well-tuned
  loop in C++ on CPU in torch >= 2.9). Its backward fails on expanded (stride-0) incoming gradients
  such as the one `y.sum().backward()` produces, so the output passes through an identity whose
  backward makes the gradient contiguous.

`select_grouped_mm(backend, device, dtype)` picks one: "auto" takes the per-expert mm path on CPU, and
elsewhere `torch._grouped_mm` when a small probe with gradients succeeds on that device type and dtype
(cached), otherwise the per-expert mm path. `grouped_mm_choice` is that rule by name, for callers that need
the choice without the function (the experts layer, the memory planner). This file is where vendor-specific kernel choices belong (a vendor's grouped GEMM goes here as another backend), so
the layers never know which device they run on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moe_plugin.kernels.native import native_ops, native_status

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BACKENDS = ("auto", "native", "torch", "mm", "loop")


def grouped_mm_loop(x_NI: torch.Tensor, w_EIO: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Reference/fallback: one matmul per expert over its contiguous slice of copies."""
    counts = host_counts(tokens_per_expert_E)
    if sum(counts) != x_NI.shape[0]:
        raise ValueError(f"tokens_per_expert sums to {sum(counts)} but x has {x_NI.shape[0]} rows.")
    out_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[-1])
    if x_NI.shape[0] == 0:
        # Keep the graph connected so that w gets a (zero) gradient on a rank with no tokens.
        return out_NO.zero_() + 0.0 * w_EIO.sum()
    outputs = [x_nI @ w_EIO[e] for e, x_nI in enumerate(torch.split(x_NI, counts, dim=0)) if counts[e] > 0]
    return torch.cat(outputs, dim=0)


class _GroupedMMPerExpert(torch.autograd.Function):
    """y_NO = x_NI @ w_EIO[e] per expert slice; backward dx = dy @ w^T, dw[e] = x_e^T dy_e (host counts)."""

    @staticmethod
    def forward(ctx: Any, x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: list[int]) -> torch.Tensor:  # type: ignore[override]
        x_NI = x_NI.contiguous()
        bounds = expert_bounds(counts)
        y_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[-1])
        for e, s, t in bounds:
            torch.mm(x_NI[s:t], w_EIO[e], out=y_NO[s:t])
        ctx.bounds = bounds
        ctx.save_for_backward(x_NI, w_EIO)
        return y_NO

    @staticmethod
    def backward(ctx: Any, dy_NO: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        x_NI, w_EIO = ctx.saved_tensors
        dy_NO = dy_NO.contiguous()
        dx_NI = torch.empty_like(x_NI) if ctx.needs_input_grad[0] else None  # every row is written
        dw_EIO = weight_grad_buffer(w_EIO, ctx.bounds) if ctx.needs_input_grad[1] else None
        for e, s, t in ctx.bounds:
            if dx_NI is not None:
                torch.mm(dy_NO[s:t], w_EIO[e].t(), out=dx_NI[s:t])
            if dw_EIO is not None:
                torch.mm(x_NI[s:t].t(), dy_NO[s:t], out=dw_EIO[e])
        return dx_NI, dw_EIO, None


def expert_bounds(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """(expert, start row, stop row) of every expert with at least one row."""
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, start, start + c))
        start += c
    return out


def weight_grad_buffer(w_EIO: torch.Tensor, bounds: list[tuple[int, int, int]]) -> torch.Tensor:
    """Uninitialised gradient for stacked weights whose busy experts the per-expert GEMMs write; the
    experts without rows get zeros."""
    grad = torch.empty_like(w_EIO, memory_format=torch.contiguous_format)
    busy = {e for e, _, _ in bounds}
    for e in range(w_EIO.shape[0]):
        if e not in busy:
            grad[e].zero_()
    return grad


def host_counts(tokens_per_expert_E: torch.Tensor | Sequence[int]) -> list[int]:
    """Counts as Python ints (a device->host copy when the tensor lives on an accelerator)."""
    return tokens_per_expert_E.tolist() if isinstance(tokens_per_expert_E, torch.Tensor) else list(tokens_per_expert_E)


def grouped_mm_mm(
    x_NI: torch.Tensor, w_EIO: torch.Tensor, tokens_per_expert_E: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """Per-expert `torch.mm` into one preallocated output, one autograd node (see the module docstring)."""
    counts = host_counts(tokens_per_expert_E)
    if sum(counts) != x_NI.shape[0]:
        raise ValueError(f"tokens_per_expert sums to {sum(counts)} but x has {x_NI.shape[0]} rows.")
    x_NI, w_EIO = _autocast_inputs(x_NI, w_EIO)
    with torch.autocast(x_NI.device.type, enabled=False):
        return _GroupedMMPerExpert.apply(x_NI, w_EIO, counts)  # type: ignore[no-any-return]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (torch._grouped_mm needs it)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return y.view_as(y)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad_y.contiguous()


def grouped_mm_torch(x_NI: torch.Tensor, w_EIO: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` with offsets = cumsum(tokens_per_expert); rows past the last offset are
    undefined in its output, so the counts must cover every row (checked by the caller's invariant).

    torch._grouped_mm needs every row stride to be a multiple of 16 bytes (I and O features times the
    element size); other shapes, and an empty batch, go through the loop.
    """
    x_NI, w_EIO = _autocast_inputs(x_NI, w_EIO)
    if x_NI.shape[0] == 0 or not _aligned(x_NI, w_EIO):
        return grouped_mm_loop(x_NI, w_EIO, tokens_per_expert_E)
    if not isinstance(tokens_per_expert_E, torch.Tensor):
        tokens_per_expert_E = torch.tensor(list(tokens_per_expert_E), device=x_NI.device)
    elif tokens_per_expert_E.device != x_NI.device:  # host counts from a dispatcher: copy, no sync
        tokens_per_expert_E = tokens_per_expert_E.to(x_NI.device, non_blocking=True)
    offs_E = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)
    y_NO = torch._grouped_mm(x_NI.contiguous(), w_EIO, offs=offs_E)
    return _ContiguousGrad.apply(y_NO) if y_NO.requires_grad else y_NO


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: the autocast dtype when autocast is on for x's device."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _autocast_inputs(x_NI: torch.Tensor, w_EIO: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch._grouped_mm is not an autocast op: cast by hand so it computes in the same dtype as the loop
    (whose `@` autocast does cast), and both paths agree under mixed precision."""
    dtype = compute_dtype(x_NI)
    return (x_NI.to(dtype), w_EIO.to(dtype)) if x_NI.dtype != dtype or w_EIO.dtype != dtype else (x_NI, w_EIO)


def _aligned(x_NI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    size = x_NI.element_size()
    return (w_EIO.shape[-2] * size) % 16 == 0 and (w_EIO.shape[-1] * size) % 16 == 0


@functools.cache
def _torch_grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe forward and backward (with an empty group) against the loop on a tiny problem."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        # Independent of the caller's context: no_grad, inference mode, autocast (a failure there would be
        # cached for the whole process), a default device (models are built under `with torch.device("meta")`
        # for inspection).
        with (
            torch.enable_grad(),
            torch.inference_mode(False),
            torch.autocast(device_type, enabled=False),
            torch.device(device_type),
        ):
            return _probe(device_type, dtype)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _probe(device_type: str, dtype: torch.dtype) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 16, generator=gen).to(device=device_type, dtype=dtype).requires_grad_()
    w = torch.randn(3, 16, 16, generator=gen).to(device=device_type, dtype=dtype).requires_grad_()
    counts = torch.tensor([5, 0, 7], device=device_type)
    y = grouped_mm_torch(x, w, counts)
    y.sum().backward()
    ref = grouped_mm_loop(x.detach(), w.detach(), counts)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    return bool(torch.allclose(y.detach().float(), ref.float(), atol=tol, rtol=tol)) and w.grad is not None


def check_backend(backend: str) -> None:
    """Validate a backend name without probing (cheap; safe on meta devices)."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_mm_backend={backend!r} is not one of {BACKENDS}; use 'auto' unless debugging.")


def grouped_mm_choice(backend: str, device_type: str, dtype: torch.dtype | None = None) -> str:
    """The rule of `select_grouped_mm`, by name: "loop", "mm" (the per-expert mm node), "native" (the same node
    compiled for CPU, kernels/native.py) or "torch".

    "auto": on CPU "native" when the compiled kernels build and load here, else "mm"; elsewhere "torch" when
    torch._grouped_mm works on `device_type` with `dtype` (probed once per device type and dtype), else "mm".
    With `dtype=None` nothing is probed or built: CPU counts as "mm" (the compiled node saves the same tensors)
    and torch._grouped_mm is assumed to work off CPU, the view of a caller planning for hardware it does not
    run on (parallel/plan.py). "native" off CPU, or where it cannot be built, is an error naming the key.
    """
    check_backend(backend)
    if backend == "loop":
        return "loop"
    if backend == "native":
        if device_type != "cpu":
            raise ValueError(
                f"model.moe.grouped_mm_backend='native' is the compiled CPU kernel, but the experts run on "
                f"{device_type}; use 'auto' (torch._grouped_mm where it works)."
            )
        if dtype is not None and native_ops() is None:
            raise ValueError(
                "model.moe.grouped_mm_backend='native' but the compiled CPU kernels are not available here "
                f"({native_status()}); use 'auto' or 'mm' (the Python path, same results)."
            )
        return "native"
    if backend == "auto" and device_type == "cpu":
        return "native" if dtype is not None and native_ops() is not None else "mm"
    if backend == "mm":
        return "mm"
    if backend == "torch" or dtype is None:
        return "torch"
    return "torch" if _torch_grouped_mm_works(device_type, dtype) else "mm"


def select_grouped_mm(
    backend: str = "auto", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> GroupedMM:
    """The grouped-matmul implementation for `backend` on `device`/`dtype` (the rule: `grouped_mm_choice`).

    "auto": the per-expert mm node on CPU; elsewhere torch._grouped_mm when it works there (probed once per
    device type and dtype), else the per-expert mm node. "torch": torch._grouped_mm, error if it does not
    work there. "mm": the per-expert mm node. "loop": the reference loop (autograd through every op).
    """
    device_type = torch.device(device).type
    # On CPU every choice but "loop" is the per-expert mm node here (the compiled kernel is the whole SwiGLU MLP,
    # layers/experts.py): decide without building it.
    choice = grouped_mm_choice(backend, device_type, None if device_type == "cpu" else dtype)
    if backend == "torch" and not _torch_grouped_mm_works(device_type, dtype):
        raise ValueError(
            f"grouped_mm_backend='torch' but torch._grouped_mm does not work on {device_type} with {dtype} in "
            f"torch {torch.__version__}; set grouped_mm_backend='auto' or 'loop'."
        )
    # The compiled kernel is the whole SwiGLU MLP (layers/experts.py); a lone grouped GEMM takes the mm node.
    return {"loop": grouped_mm_loop, "mm": grouped_mm_mm, "native": grouped_mm_mm, "torch": grouped_mm_torch}[choice]


def grouped_mm_backend_name(fn: GroupedMM) -> str:
    """Human-readable name of an implementation (for `moe-plugin doctor` and logs)."""
    names = {grouped_mm_torch: "torch._grouped_mm", grouped_mm_mm: "per-expert mm", grouped_mm_loop: "loop"}
    return names.get(fn, getattr(fn, "__name__", "custom"))
