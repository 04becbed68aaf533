"""Rotary position embedding (Su et al. 2021, RoFormer), the "rotate half" layout used by Llama and Ling.

Shapes: B batch, S sequence, H heads, Dh head dim.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [S, Dh] for angles pos * theta^(-2i/Dh)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs_SDh2 = torch.outer(pos, inv_freq)
    emb_SDh = torch.cat([freqs_SDh2, freqs_SDh2], dim=-1)
    return emb_SDh.cos(), emb_SDh.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHSDh: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in float32, cast back to the input dtype."""
    x32 = x_BHSDh.float()
    return (x32 * cos_SDh + _rotate_half(x32) * sin_SDh).to(x_BHSDh.dtype)
