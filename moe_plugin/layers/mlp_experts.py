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

from moe_plugin.kernels.grouped_mm import check_backend, select_grouped_mm


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
        grouped_mm_backend: str = "auto",
    ) -> None:
        super().__init__()
        check_backend(grouped_mm_backend)
        self.grouped_mm_backend = grouped_mm_backend
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
        """The module docstring's formula for every copy, through the grouped-matmul seam (kernels/)."""
        gmm = select_grouped_mm(self.grouped_mm_backend, x_ND.device, x_ND.dtype)
        counts_E = tokens_per_expert_E.to(x_ND.device)

        def affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            y = gmm(x, w, tokens_per_expert_E)
            # Each copy gets its expert's bias: row e of b repeated for that expert's copies.
            return y if b is None else y + b.repeat_interleave(counts_E, dim=0, output_size=x.shape[0])

        up_NF = affine(x_ND, self.w_up_EDF, self.b_up_EF)
        if self.w_gate_EDF is not None:
            h_NF = self.activation(affine(x_ND, self.w_gate_EDF, self.b_gate_EF)) * up_NF
        else:
            h_NF = self.activation(up_NF)
        return affine(h_NF, self.w_down_EFD, self.b_down_ED)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"ffn_hidden_size={self.ffn_hidden_size}, gated={self.gated}, bias={self.b_up_EF is not None}"
        )
