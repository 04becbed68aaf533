"""Activation checkpointing, applied from outside to a built model (no change to its math).

    model.activation_checkpointing = none | full | selective
        full       every decoder block keeps only its input; its activations are recomputed in backward
        selective  model.activation_checkpointing_target = blocks: every N-th block
                   (N = model.activation_checkpointing_every), or = experts: the routed experts of every
                   MoE layer only (their [N, F] intermediate activations dominate MoE memory)

A checkpointed module's `forward` is replaced on the instance (parameter names do not change, so
checkpoints, expert-parallel plans and FSDP2 keep working; apply it before fully_shard, as torchtitan
does) by torch.utils.checkpoint (non-reentrant) around the original forward.

Recomputation routes exactly as the first forward did:
- random numbers (router jitter): torch's checkpoint saves and restores the RNG state
  (preserve_rng_state=True), so the same noise is drawn again; the routing-warmup noise is a hash of its
  keys (layers/routing_warmup.py), the same in any forward;
- module state changed by a forward (staged routing-warmup moments, expert-bias buffers, the MoE layer's
  last_losses / aux_loss / total_copies / total_dropped counters): before recomputing, the buffers and
  public attributes of the checkpointed module are set to what they were when the first forward ended,
  and afterwards back to what they were before recomputing. The recomputation thus sees the statistics
  the first forward used (the routing warmup stages its moments only outside backward and reuses the
  first forward's step-0 moments, layers/routing_warmup.py), and nothing it counts or updates
  survives it: a statistic changes once per forward.
- collectives inside the module (the all-to-all, router-count all-reduce, FSDP2 all-gathers) run again
  in backward, in the same order on every rank (every rank recomputes the same modules).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "full", "selective")
TARGETS = ("blocks", "experts")


def check_activation_checkpointing(mode: str, target: str = "blocks", every: int = 1) -> None:
    """Raise ValueError naming the key, the value and the fix."""
    if mode not in MODES:
        raise ValueError(f"model.activation_checkpointing={mode!r} must be one of {list(MODES)}.")
    if target not in TARGETS:
        raise ValueError(f"model.activation_checkpointing_target={target!r} must be one of {list(TARGETS)}.")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"model.activation_checkpointing_every={every!r} must be an integer >= 1 (1 = every block).")


_State = list[tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor], list[tuple[Any, dict[str, Any]]]]]


def _state(module: nn.Module) -> _State:
    """(module, public attributes, buffer copies, attribute objects' own fields) of `module` and its submodules.

    Plain objects held by a module (e.g. the MoE layer's RoutingStats) are mutated rather than replaced by a
    forward: their fields are copied one level deep (the tensors in them are replaced, never written in place).
    """
    out = []
    for m in module.modules():
        attrs = {k: v for k, v in vars(m).items() if not k.startswith("_")}
        buffers = {k: b.detach().clone() for k, b in m._buffers.items() if b is not None}
        objects = [
            (v, dict(vars(v)))
            for v in attrs.values()
            if hasattr(v, "__dict__") and not isinstance(v, (nn.Module, torch.Tensor)) and not callable(v)
        ]
        out.append((m, attrs, buffers, objects))
    return out


@torch.no_grad()
def _restore(state: _State) -> None:
    for m, attrs, buffers, objects in state:
        for k in [k for k in vars(m) if not k.startswith("_") and k not in attrs]:
            delattr(m, k)
        for k, v in attrs.items():
            setattr(m, k, v)
        for k, b in buffers.items():
            m._buffers[k].copy_(b)  # type: ignore[union-attr]
        for obj, fields in objects:
            vars(obj).clear()
            vars(obj).update(fields)


def _contexts(module: nn.Module) -> tuple[Any, Any]:
    """(forward context, recompute context) for torch.utils.checkpoint's context_fn (see the module docstring)."""
    saved: dict[str, Any] = {}

    @contextmanager
    def first_forward() -> Iterator[None]:
        yield
        saved["after"] = _state(module)

    @contextmanager
    def recompute() -> Iterator[None]:
        now = _state(module)
        _restore(saved["after"])
        try:
            yield
        finally:
            _restore(now)

    return first_forward(), recompute()


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Make `module` recompute its activations in backward (in place, idempotent). Returns it."""
    if getattr(module, "_moe_plugin_recompute", False):
        return module
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation: nothing to save
            return inner(*args, **kwargs)
        return checkpoint(
            inner,
            *args,
            use_reentrant=False,
            preserve_rng_state=True,
            context_fn=functools.partial(_contexts, module),
            **kwargs,
        )

    module.forward = forward  # type: ignore[method-assign]
    module._moe_plugin_recompute = True  # type: ignore[attr-defined]
    return module


def apply_activation_checkpointing(
    model: nn.Module, mode: str = "none", target: str = "blocks", every: int = 1
) -> list[str]:
    """Apply `mode` to `model` (see the module docstring); returns the names of the checkpointed modules."""
    check_activation_checkpointing(mode, target, every)
    if mode == "none":
        return []
    from moe_plugin.layers.moe import moe_layers
    from moe_plugin.parallel.sharding import decoder_blocks

    if mode == "selective" and target == "experts":
        names = {id(m): n for n, m in model.named_modules()}
        chosen = [(names[id(layer.experts)], layer.experts) for layer in moe_layers(model)]
    else:
        blocks = decoder_blocks(model)
        if not blocks:
            raise ValueError(
                f"model.activation_checkpointing={mode}: {type(model).__name__} has no repeated blocks (no nn.ModuleList "
                "of layers) to checkpoint. Use activation_checkpointing_target=experts or none."
            )
        step = 1 if mode == "full" else every
        chosen = [(n, b) for i, (n, b) in enumerate(blocks) if i % step == 0]
    for _, m in chosen:
        checkpoint_module(m)
    return [n for n, _ in chosen]
