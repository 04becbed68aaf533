"""Build a model without memory, then give each rank only its own shards, initialised independently of the layout.

    with meta_init_context():            # matrices on the meta device, vectors (norms, biases, buffers) real
        model = MoEDecoderLM(...)
    apply_expert_parallel(model, mesh)   # slices the (meta) experts: no memory
    apply_sharded_data_parallel(...)     # FSDP2 shards the (meta) dense matrices: no memory
    materialise_(model, seed, device)    # allocate the local shards and initialise them

Layout-independent initialisation: every matrix (dim >= 2) gets its values from a CPU generator seeded by

    seed_p   = H(seed, parameter name)                      for a dense parameter (generated whole, then
                                                            sliced to this rank's shard)
    seed_p,e = H(seed, parameter name, global expert id e)   for expert e of a stacked expert weight
                                                            (generated one expert at a time)

with H the first 63 bits of sha256. A rank generates only the experts it holds, and one dense parameter
at a time, so the peak host memory of set-up is about P / W plus the largest dense parameter, and the
full weights are the same bit for bit at every (EP, shard size, world size), 1 process included (tested
by gathering). The values come from the model's own rule: the nearest ancestor module defining
`init_parameter_(name, tensor, generator)` (MoEDecoderLM does) is called with the name relative to it.
Vectors keep the values their constructors gave them (deterministic: ones, zeros).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from moe_plugin.layers.moe import moe_layers
from moe_plugin.parallel.checkpoint_sharded import copy_full_into_


class _MatricesOnMeta(TorchFunctionMode):
    """Tensor factories without an explicit device: matrices on `meta`, everything smaller on the default device."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            out = func(*args, **{**kwargs, "device": "meta"})
            if out.dim() >= 2:
                return out
        return func(*args, **kwargs)


@contextmanager
def meta_init_context() -> Iterator[None]:
    """Construct modules with their matrices on the meta device (no memory, no random numbers drawn for them)."""
    with _MatricesOnMeta():
        yield


def derived_seed(seed: int, name: str, expert: int | None = None) -> int:
    """H(seed, name[, expert]): the first 63 bits of sha256 (stable across processes, platforms and versions)."""
    text = f"{seed}/{name}" if expert is None else f"{seed}/{name}/{expert}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _initialiser(model: nn.Module, name: str) -> tuple[Any, str]:
    """(init_parameter_ of the nearest ancestor defining it, name relative to that ancestor)."""
    parts = name.split(".")
    modules = [model]
    for part in parts[:-1]:
        modules.append(getattr(modules[-1], part))
    for depth in range(len(modules) - 1, -1, -1):
        fn = getattr(modules[depth], "init_parameter_", None)
        if callable(fn):
            return fn, ".".join(parts[depth:])
    raise ValueError(
        f"{name} was built on the meta device but no module above it defines init_parameter_(name, tensor, "
        "generator): the plugin cannot initialise it. Add that method to your model (see MoEDecoderLM), or set "
        "strategy.meta_init=false to build the whole model on every rank."
    )


def _local_box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of `t` (the whole tensor if it is not a DTensor)."""
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return tuple(shape), tuple(offset)
    return tuple(t.shape), (0,) * t.dim()


@torch.no_grad()
def materialise_(
    model: nn.Module,
    seed: int,
    device: torch.device | str = "cpu",
    expert_params: dict[str, tuple[int, int, int]] | None = None,
) -> list[str]:
    """Allocate every meta parameter of `model` on `device` (only the local shard) and initialise it.

    expert_params: name -> (E, start, stop) of the stacked expert weights (ExpertParallelPlan.expert_params):
    row i of the local tensor is global expert start + i. None: found from the model's MoE layers (their
    experts' expert_offset). Returns the names initialised.
    """
    if expert_params is None:
        expert_params = _expert_params(model)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if any(b.is_meta for b in model.buffers()):
        raise ValueError("a buffer was built on the meta device; meta_init_context keeps buffers real (>= 2-D buffer?)")
    if not meta:
        return []
    # to_empty replaces every tensor (FSDP2 re-binds its sharded parameters there): keep the real ones
    keep = {n: _local(p).detach().clone() for n, p in model.named_parameters() if not p.is_meta}
    keep_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for n, t in keep.items():
        _local(params[n]).copy_(t)
    for n, t in keep_buffers.items():
        buffers[n].copy_(t)
    for name in meta:
        p = params[name]
        init, rel = _initialiser(model, name)
        if name in expert_params:
            _init_experts(p, init, rel, seed, expert_params[name][1])
        else:
            full = torch.empty(p.shape, dtype=p.dtype)
            init(rel, full, _generator(derived_seed(seed, rel)))
            copy_full_into_(p, full.to(_local(p).device))
    return meta


def _expert_params(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    out = {}
    names = {id(m): n for n, m in model.named_modules()}
    for layer in moe_layers(model):
        start = int(getattr(layer.experts, "expert_offset", 0))
        prefix = names[id(layer.experts)]
        for pname, p in layer.experts.named_parameters():
            out[f"{prefix}.{pname}" if prefix else pname] = (layer.num_experts, start, start + p.shape[0])
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _init_experts(p: torch.Tensor, init: Any, rel: str, seed: int, start: int) -> None:
    """Rows of the local shard one expert at a time: expert `start + row` from its own generator."""
    shape, offset = _local_box(p)
    local = _local(p)
    if local.numel() == 0:
        return
    one = torch.empty((1, *p.shape[1:]), dtype=p.dtype)
    for row in range(shape[0]):
        e = start + offset[0] + row
        init(rel, one, _generator(derived_seed(seed, rel, e)))
        piece = one[0]
        for d in range(1, len(shape)):  # an expert split on a later dim (more shard ranks than experts)
            piece = piece.narrow(d - 1, offset[d], shape[d])
        local[row].copy_(piece.to(local.device))
