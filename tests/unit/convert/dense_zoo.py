"""Small dense models written the way users write them, shared by the convert tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """Meta's reference naming: w1 = gate, w3 = up, w2 = down; the activation is a function call."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeGLU(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=True)
        self.up_proj = nn.Linear(d, f, bias=True)
        self.down_proj = nn.Linear(f, d, bias=True)
        self.act_fn = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FusedSwiGLU(nn.Module):
    """Phi-3 style: one [D -> 2F] projection holding [gate | up]."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(d, 2 * f, bias=True)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.activation_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.activation_fn(gate) * up)


class GELUMLP(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(f, d)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


def sequential_mlp(d: int, f: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d), nn.Dropout(0.0))


class Block(nn.Module):
    def __init__(self, d: int, f: int, ffn: type | object) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)  # stands in for attention: a token-wise layer before the FFN
        self.ffn = ffn(d, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(self.mix(x))
        return x + self.ffn(self.norm(x))


class TinyLM(nn.Module):
    def __init__(self, ffn: type | object = SwiGLU, vocab: int = 50, d: int = 16, f: int = 64, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, f, ffn) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def scramble_(model: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Non-trivial weights (biases too), so that equalities cannot hold by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
