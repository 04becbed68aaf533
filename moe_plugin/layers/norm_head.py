"""NormHead (Ling, Baichuan 2): LM head whose weight rows are divided by their L2 norm.

    logits = h @ (W / max(||W||_0, eps))^T

where the norm is taken over dim 0 of the [V, D] weight (one norm per hidden column, as in the released
Ling code), detached so it only rescales, with eps 1e-7. `fold()` bakes the normalisation into the weight
for export or inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormHead(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def normalized_weight(self) -> torch.Tensor:
        norm_1D = self.weight.norm(p=2, dim=0, keepdim=True).detach().clamp_min(self.eps)
        return self.weight / norm_1D

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.normalized_weight())

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """A plain nn.Linear with the normalisation folded in (same logits)."""
        vocab_size, hidden_size = self.weight.shape
        linear = nn.Linear(hidden_size, vocab_size, bias=False, device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(self.normalized_weight())
        return linear
