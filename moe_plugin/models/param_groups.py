"""Which parameters get weight decay: one rule for the optimizer and for offline checkpoint converters."""

from __future__ import annotations

from torch import nn


def decay_groups(model: nn.Module, prefix: str = "") -> tuple[list[str], list[str]]:
    """Names of the trainable parameters with and without weight decay, in configure_optimizers' order (what
    the integer ids of a saved optimizer state refer to; offline converters rebuild the groups with this)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Norm weights, biases and 1-D parameters are not decayed (standard for transformers).
        (no_decay if p.dim() < 2 or name.endswith(".bias") else decay).append(prefix + name)
    return decay, no_decay
