"""The planner's SwiGLU activation terms follow the experts' kernel path, and match what autograd really saves.

Measured with saved-tensor hooks: the bytes of every distinct storage autograd keeps from a forward, minus the
parameters and the layer's input (counted by the planner elsewhere: the expert input copy, the norm's output).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_plugin.accelerators.catalog import get_device
from moe_plugin.cli.inspect import build_meta_model
from moe_plugin.layers.experts import GroupedExperts, fuse_gate_up, runs_fused_swiglu
from moe_plugin.layers.feed_forward import FeedForward
from moe_plugin.parallel.plan import (
    COMPOSED_SWIGLU_SAVED,
    FUSED_SWIGLU_SAVED,
    Layout,
    ModelShape,
    get_precision,
    memory,
    model_shape,
    plan,
    planned_device_type,
    routed_expert_intermediates,
)

FP32 = get_precision("32-true")


@pytest.fixture(scope="module")
def tiny() -> ModelShape:
    name, model, seq_len = build_meta_model(["model=ling_tiny"], 256)
    return model_shape(model, seq_len, name)


def saved_bytes(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in `module(*inputs)`, parameters and inputs excluded."""
    module(*inputs)  # once outside the hooks: the grouped-GEMM probe (cached) saves tensors of its own
    excluded = {p.untyped_storage().data_ptr() for p in module.parameters()}
    excluded |= {x.untyped_storage().data_ptr() for x in inputs}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in excluded:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs).sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize(
    ("backend", "num_experts", "fused"),
    [("mm", 4, True), ("auto", 4, True), ("loop", 4, False), ("torch", 4, False), ("torch", 1, False)],
)
def test_routed_expert_saved_activations_match_the_kernel(
    tiny: ModelShape, backend: str, num_experts: int, fused: bool
) -> None:
    """The fused SwiGLU node keeps g and u (2 N x F); autograd through grouped GEMMs keeps gate, up, silu(gate)
    and h (4 N x F), plus the gate|up weight copy when the layer fuses the two GEMMs (one expert here)."""
    torch.manual_seed(0)
    D, F, N = 16, 32, 40
    experts = GroupedExperts(num_experts, D, F, grouped_mm_backend=backend)
    counts = torch.full((num_experts,), N // num_experts)
    x = torch.randn(N, D, requires_grad=True)
    assert runs_fused_swiglu(backend, "cpu", torch.float32) is fused
    k = routed_expert_intermediates(dataclasses.replace(tiny, grouped_mm_backend=backend), "cpu")
    assert k == (FUSED_SWIGLU_SAVED if fused else COMPOSED_SWIGLU_SAVED)
    weight_copy = 0 if fused or not fuse_gate_up(num_experts, D, N) else num_experts * D * 2 * F * 4
    assert weight_copy > 0 or num_experts > 1  # the one-expert case exercises the weight copy
    assert saved_bytes(experts, x, counts) == k * N * F * 4 + weight_copy


def test_feed_forward_saves_four_intermediates() -> None:
    """FeedForward (shared experts, first_k_dense blocks): plain autograd keeps gate, up, silu(gate) and h."""
    T, D, F = 24, 16, 48
    x = torch.randn(T, D, requires_grad=True)
    assert saved_bytes(FeedForward(D, F), x) == COMPOSED_SWIGLU_SAVED * T * F * 4


def test_shape_reads_the_backend() -> None:
    name, model, seq_len = build_meta_model(["model=ling_tiny", "model.moe.grouped_mm_backend=loop"], 256)
    assert model_shape(model, seq_len, name).grouped_mm_backend == "loop"


@pytest.mark.parametrize(
    ("backend", "device_type", "k"),
    [
        ("auto", "cpu", 2),  # the fused CPU node
        ("auto", "cuda", 4),  # torch._grouped_mm (assumed to work on an accelerator)
        ("auto", "accelerator", 4),
        ("mm", "cuda", 2),
        ("torch", "cpu", 4),
        ("loop", "cpu", 4),
    ],
)
def test_routed_term_follows_backend_and_hardware(tiny: ModelShape, backend: str, device_type: str, k: int) -> None:
    shape = dataclasses.replace(tiny, grouped_mm_backend=backend)
    assert routed_expert_intermediates(shape, device_type) == k
    layout = Layout(2, 2, 1, micro_batch=2)
    m = memory(shape, layout, FP32, device_type=device_type)
    T = 2 * shape.seq_len
    n, D, F = T * shape.top_k, shape.hidden, shape.expert_hidden
    per_layer = 2 * n * D * 4 + k * n * F * 4
    if k == 4 and fuse_gate_up(shape.num_experts // 2, D, n):
        per_layer += shape.num_experts // 2 * D * 2 * F * 4
    assert m.terms["activations.routed_experts"] == shape.num_moe_layers * per_layer
    assert m.terms["activations.shared_experts"] == shape.num_moe_layers * 4 * T * shape.shared_hidden * 4


def test_fused_path_saves_less_and_selective_recomputes_its_own_terms(tiny: ModelShape) -> None:
    """CPU (fused) vs accelerator (autograd): 2 N x F fewer per MoE layer, a smaller backward workspace; selective
    checkpointing recomputes k N x F for one layer."""
    n = 4 * tiny.seq_len * tiny.top_k
    F = tiny.expert_hidden
    for ckpt in ("none", "selective", "full"):
        layout = Layout(1, 1, 1, checkpointing=ckpt, micro_batch=4)
        cpu = memory(tiny, layout, FP32, foreach=False, device_type="cpu")
        acc = memory(tiny, layout, FP32, foreach=False, device_type="cuda")
        assert cpu.terms["backward_workspace"] < acc.terms["backward_workspace"]
        assert not fuse_gate_up(tiny.num_experts, tiny.hidden, n)  # no weight copy in either here
        diff = acc.terms["activations"] - cpu.terms["activations"]
        if ckpt == "none":
            assert diff == pytest.approx(tiny.num_moe_layers * 2 * n * F * 4)
        else:  # one layer's intermediates are recomputed (selective) or inside the recomputed block (full)
            assert diff == pytest.approx(2 * n * F * 4)


def test_plan_uses_the_hardware_device_type(tiny: ModelShape) -> None:
    """A CPU plan: the fused experts node and AdamW one tensor at a time; an accelerator plan: autograd, foreach."""
    cpu = dataclasses.replace(get_device("cpu"), memory_gb=24.0, peak_tflops_bf16=1.0)
    assert planned_device_type(cpu) == "cpu"
    assert planned_device_type(get_device("h100")) == "cuda"
    assert planned_device_type(get_device("device_d")) == "accelerator"  # anonymised: no vendor
    layout = Layout(2, 2, 1, micro_batch=1)
    for spec, device_type, foreach in ((cpu, "cpu", False), (get_device("h100"), "cuda", True)):
        result = plan(tiny, spec, 2, FP32, 0.2, eps=(2,), shards=(1,), checkpointing=("none",), micro_batches=(1,))
        (entry,) = result.entries
        want = memory(tiny, layout, FP32, foreach=foreach, device_type=device_type)
        assert entry.memory is not None and entry.memory.terms == want.terms
