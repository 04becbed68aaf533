"""Regional compilation: `torch.compile` applied to each decoder block, from outside the model math.

Shapes: none (module surgery only).

As torchtitan does, every block of `model.layers` is compiled on its own (`nn.Module.compile`, in place:
parameter names and checkpoints do not change) instead of the whole model: the blocks share one
structure, so with torch's default inlining of built-in modules the graph is compiled once and reused
by every block, compile time stays that of one block, and the embedding / head stay eager.

Inside a block, the routed-expert path of an MoE layer (route -> permute -> dispatch -> experts ->
combine, `MoE._routed`) runs eagerly behind `torch.compiler.disable`: its per-expert GEMM sizes and the
all-to-all splits depend on the routing (a host sync), collectives live there, and recompiling for every
routing would cost more than it saves. The graph breaks there; attention, norms, RoPE, residuals and the
shared experts around it are compiled (inductor fuses their elementwise work). This holds for the local
and the all-to-all dispatcher alike.

Activation checkpointing: apply the checkpoint wrapper first, then compile (torchtitan's order); the
compiled callable is then the wrapped block, whose recomputation replays the compiled forward.

`model.compile=true` asks for this (train.py -> lightning/run.py calls `compile_blocks`); the model
itself only records the request.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def compile_blocks(model: nn.Module, blocks_attr: str = "layers", **compile_kwargs: Any) -> int:
    """Compile every block of `model.<blocks_attr>` (an nn.ModuleList) in place; returns how many.

    compile_kwargs go to torch.compile (default backend "inductor", fullgraph False: graph breaks at the
    routed experts are expected). Idempotent: a block compiled before is compiled again with the new
    arguments.
    """
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"model.compile=true compiles each block of model.{blocks_attr}, but {type(model).__name__} has no "
            f"nn.ModuleList named {blocks_attr!r}; pass blocks_attr=<the attribute holding your blocks>."
        )
    kwargs = {"fullgraph": False, **compile_kwargs}
    for block in blocks:
        block.compile(**kwargs)
    return len(blocks)


def is_compiled(block: nn.Module) -> bool:
    """Whether `compile_blocks` (nn.Module.compile) was applied to this module."""
    return getattr(block, "_compiled_call_impl", None) is not None
