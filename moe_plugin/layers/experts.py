"""Routed experts: E SwiGLU MLPs with weights stacked per layer.

Shapes: E experts held by this module (all of them, or this rank's local slice under expert
parallelism), D hidden, F expert FFN hidden, N token copies sorted by (local) expert.

    h_NF = silu(x_ND @ w_gate_EDF[e]) * (x_ND @ w_up_EDF[e])
    y_ND = h_NF @ w_down_EFD[e]                                 for each copy n of expert e

`forward` takes token copies already grouped by expert (see permute.py, dispatch/) with the count per
expert, and runs the three projections through the grouped-matmul seam (moe_plugin.kernels): on CPU (and
with grouped_mm_backend="mm" or "native") the whole MLP as one fused autograd node of per-expert GEMMs
(kernels/swiglu_experts.py; compiled for CPU threads where it builds, kernels/native.py), torch._grouped_mm on accelerators where it works, the reference loop on
request. With every expert on this rank and dropless routing, the MoE layer can hand the whole
permute -> experts -> combine to `local_routed` (kernels/local_moe.py: no x_ND / y_ND in memory). `experts_loop` below is the slow, obvious reference the fast paths are tested against.

Expert parallelism: a rank holds `num_experts` = E_local experts whose global ids are
expert_offset .. expert_offset + E_local - 1 (checkpoints store experts by global id).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_plugin.kernels.grouped_mm import GroupedMM, check_backend, compute_dtype, grouped_mm_choice, select_grouped_mm
from moe_plugin.kernels.local_moe import local_moe_supported, local_swiglu_moe
from moe_plugin.kernels.swiglu_experts import swiglu_experts

# The grouped-GEMM choices served by the fused SwiGLU node: its Python loop ("mm") and its compiled form.
FUSED_SWIGLU_CHOICES = ("mm", "native")


class GroupedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        grouped_mm_backend: str = "auto",
        expert_offset: int = 0,
    ) -> None:
        super().__init__()
        if num_experts < 1 or hidden_size < 1 or ffn_hidden_size < 1:
            raise ValueError(
                f"GroupedExperts needs positive sizes, got num_experts={num_experts}, hidden_size={hidden_size}, "
                f"expert_hidden_size={ffn_hidden_size}."
            )
        check_backend(grouped_mm_backend)  # validate the name now, not at the first forward
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.grouped_mm_backend = grouped_mm_backend
        self.expert_offset = expert_offset
        self.w_gate_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default for each expert's projections.
        for w in (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)

    def grouped_mm(self, x: torch.Tensor) -> GroupedMM:
        return select_grouped_mm(self.grouped_mm_backend, x.device, compute_dtype(x))

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert has shape {tuple(tokens_per_expert_E.shape)}, expected ({self.num_experts},) "
                "(one count per local expert)."
            )
        choice = grouped_mm_choice(self.grouped_mm_backend, x_ND.device.type, compute_dtype(x_ND))
        if choice in FUSED_SWIGLU_CHOICES:
            # The per-expert mm path (the CPU default, compiled where it builds): the whole SwiGLU MLP as one
            # autograd node.
            w = (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD)
            return swiglu_experts(x_ND, *w, tokens_per_expert_E, native=choice == "native")
        gmm = self.grouped_mm(x_ND)
        if fuse_gate_up(self.num_experts, self.hidden_size, x_ND.shape[0]):
            # Gate and up as ONE grouped GEMM of width 2F: half the kernel calls (per expert on CPU),
            # wider GEMMs. The weights stay separate parameters (checkpoints, expert parallelism and
            # converters address w_gate_EDF / w_up_EDF), so this copies E*D*2F values per forward.
            w_gate_up_ED2F = torch.cat([self.w_gate_EDF, self.w_up_EDF], dim=2)
            gate_NF, up_NF = gmm(x_ND, w_gate_up_ED2F, tokens_per_expert_E).chunk(2, dim=1)
        else:
            gate_NF = gmm(x_ND, self.w_gate_EDF, tokens_per_expert_E)
            up_NF = gmm(x_ND, self.w_up_EDF, tokens_per_expert_E)
        return gmm(F.silu(gate_NF) * up_NF, self.w_down_EFD, tokens_per_expert_E)

    def fuses_local_routing(self, x: torch.Tensor) -> bool:
        """Whether `local_routed` can serve x: the fused per-expert SwiGLU node's backend on a device the
        fused local kernel is written for (kernels/local_moe.py), and every expert held here."""
        fused_node = runs_fused_swiglu(self.grouped_mm_backend, x.device.type, compute_dtype(x))
        return self.expert_offset == 0 and local_moe_supported(x.device) and fused_node

    def local_routed(
        self,
        x_TD: torch.Tensor,
        probs_TK: torch.Tensor,
        order_N: torch.Tensor,
        token_idx_N: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
    ) -> torch.Tensor:
        """permute -> experts -> weighted combine in one fused node (dropless, all experts local):
        out_TD[t] = sum_k probs_TK[t, k] * SwiGLU_{e(t,k)}(x_TD[t]), with order_N / token_idx_N /
        tokens_per_expert_E from layers.permute.sort_by_expert. Only when `fuses_local_routing(x_TD)`."""
        w = (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD)
        return local_swiglu_moe(x_TD, probs_TK, *w, order_N, token_idx_N, tokens_per_expert_E)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
            f"expert_offset={self.expert_offset}, grouped_mm_backend={self.grouped_mm_backend!r}"
        )


def runs_fused_swiglu(grouped_mm_backend: str, device_type: str, dtype: torch.dtype | None = None) -> bool:
    """Whether `forward` runs the whole MLP as the fused SwiGLU node (kernels/swiglu_experts.py: saves g and u
    only) rather than autograd through grouped GEMMs and SwiGLU ops (saves gate, up, silu(gate) and h): the
    fused node is taken wherever the grouped-GEMM rule picks the per-expert mm path. `dtype=None`: no probe,
    torch._grouped_mm assumed to work off CPU (the memory planner's view of hardware it does not run on)."""
    return grouped_mm_choice(grouped_mm_backend, device_type, dtype) in FUSED_SWIGLU_CHOICES


def fuse_gate_up(num_experts: int, hidden_size: int, num_copies: int) -> bool:
    """Fuse gate and up when the weight copy (E*D*2F) is at most half the activations it feeds (N*2F),
    i.e. E*D <= N/2: then the saved kernel calls outweigh the copy and its gradient (measured on CPU:
    faster for 8 experts x 1024 copies each, slower and +25% peak memory for 64 experts x 384)."""
    return 2 * num_experts * hidden_size <= num_copies


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
