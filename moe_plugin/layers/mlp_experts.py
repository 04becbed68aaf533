"""Routed experts of any MLP shape: gated or not, any elementwise activation, optional biases.

Shapes: E experts, D hidden, F expert FFN hidden, N token copies sorted by expert.

    gated:      y_n = (act(x_n @ w_gate_EDF[e] + b_gate_EF[e]) * (x_n @ w_up_EDF[e] + b_up_EF[e]))
                      @ w_down_EFD[e] + b_down_ED[e]
    not gated:  y_n = act(x_n @ w_up_EDF[e] + b_up_EF[e]) @ w_down_EFD[e] + b_down_ED[e]

`GroupedExperts` (experts.py) is the SwiGLU, bias-free case that our own models use and that has the
fast grouped-matmul path. This module exists so that a dense FFN of another shape (a GPT-2 MLP with
biases and tanh-GELU, a GeGLU MLP, a ReLU MLP) can be turned into experts that compute exactly the
same function, which sparse upcycling needs (Komatsuzaki et al. 2022, "Sparse Upcycling",
arXiv 2212.05055: every expert starts as a copy of the dense MLP). Every parameter is stacked on a
leading expert dimension, so an expert-parallel sharder that slices dim 0 handles it unchanged.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class GroupedMLPExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: nn.Module | None = None,
        gated: bool = True,
        bias: bool = False,
        expert_offset: int = 0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        # Under expert parallelism this module holds experts expert_offset .. expert_offset + E - 1.
        self.expert_offset = expert_offset
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.gated = gated
        # The activation is the dense model's own elementwise module (nn.GELU, HF NewGELUActivation, ...),
        # copied so that both models never share state.
        self.activation = copy.deepcopy(activation) if activation is not None else nn.SiLU()
        E, D, F = num_experts, hidden_size, ffn_hidden_size
        self.w_gate_EDF = nn.Parameter(torch.empty(E, D, F)) if gated else None
        self.w_up_EDF = nn.Parameter(torch.empty(E, D, F))
        self.w_down_EFD = nn.Parameter(torch.empty(E, F, D))
        self.b_gate_EF = nn.Parameter(torch.empty(E, F)) if (gated and bias) else None
        self.b_up_EF = nn.Parameter(torch.empty(E, F)) if bias else None
        self.b_down_ED = nn.Parameter(torch.empty(E, D)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default scale for each expert's projections; biases start at zero.
        for w in (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD):
            if w is not None:
                bound = 1.0 / math.sqrt(w.shape[1])
                nn.init.uniform_(w, -bound, bound)
        for b in (self.b_gate_EF, self.b_up_EF, self.b_down_ED):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        outputs = []
        for e, x_nD in enumerate(torch.split(x_ND, tokens_per_expert_E.tolist(), dim=0)):
            outputs.append(self.expert(e, x_nD))
        return torch.cat(outputs, dim=0) if outputs else x_ND.new_zeros(0, self.hidden_size)

    def expert(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """Expert e applied to its token copies; the formula in the module docstring."""
        up_nF = _affine(x_nD, self.w_up_EDF[e], self.b_up_EF, e)
        if self.w_gate_EDF is not None:
            h_nF = self.activation(_affine(x_nD, self.w_gate_EDF[e], self.b_gate_EF, e)) * up_nF
        else:
            h_nF = self.activation(up_nF)
        return _affine(h_nF, self.w_down_EFD[e], self.b_down_ED, e)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"ffn_hidden_size={self.ffn_hidden_size}, gated={self.gated}, bias={self.b_up_EF is not None}"
        )


def _affine(x: torch.Tensor, w: torch.Tensor, b_stacked: torch.Tensor | None, e: int) -> torch.Tensor:
    return x @ w if b_stacked is None else torch.addmm(b_stacked[e], x, w)
