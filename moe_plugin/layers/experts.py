"""Routed experts: E SwiGLU MLPs with weights stacked per layer.

Shapes: E experts, D hidden, F expert FFN hidden, N token copies sorted by expert.

    y_n = (silu(x_n @ w_gate_EDF[e]) * (x_n @ w_up_EDF[e])) @ w_down_EFD[e]   for each copy n of expert e

`forward` takes token copies already grouped by expert (see permute.py) with the count per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.w_gate_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default for each expert's projections.
        for w in (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return experts_loop(x_ND, tokens_per_expert_E, self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD)


def experts_loop(
    x_ND: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    w_down_EFD: torch.Tensor,
) -> torch.Tensor:
    """Slow, obvious reference: one matmul chain per expert over its slice of tokens."""
    outputs = []
    for e, x_nD in enumerate(torch.split(x_ND, tokens_per_expert_E.tolist(), dim=0)):
        h_nF = F.silu(x_nD @ w_gate_EDF[e]) * (x_nD @ w_up_EDF[e])
        outputs.append(h_nF @ w_down_EFD[e])
    return torch.cat(outputs, dim=0) if outputs else x_ND.new_zeros(0, w_down_EFD.shape[-1])
