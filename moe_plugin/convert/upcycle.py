"""Sparse upcycling: initialise an MoE layer from a dense FFN so that it computes the same function.

Shapes: D hidden, F dense FFN hidden, f expert FFN hidden, S shared-expert width, E experts,
K experts per token, G granularity (segments the routed part of the dense FFN is split into).

Plain upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling", arXiv 2212.05055): every expert is a copy
of the dense FFN. With top-k weights renormalised to sum to 1 (`norm_topk_prob`), each token gets

    sum_k probs_k * FFN(x) = FFN(x) * sum_k probs_k = FFN(x)

whatever the router says, so the converted model's output equals the dense model's right after
conversion. (Without renormalisation the output is scaled by the top-k score mass, which is < 1.)

Fine-grained upcycling (DeepSeekMoE-style small experts; "virtual groups" of He et al. 2024, "Upcycling
Large Language Models into Mixture of Experts", arXiv 2410.07524): a dense FFN is a sum over its F
hidden neurons, FFN(x) = sum_j act_j(x) * w_down[j, :] (+ b_down). Split the neurons into a shared part
[0, S) for the shared experts and G segments of f neurons each for the routed experts (F = S + G*f).
Expert e holds segment e mod G, so experts v*G .. v*G+G-1 form virtual group v holding the whole FFN.
The router rows of a virtual group are tied (equal), so the group's members have equal logits and top-k,
with K a multiple of G, always picks whole groups (m = K/G of them). Renormalised, the weights of the
K picked experts sum to 1 and are equal within a group: p_v for each of group v's G members with
G * sum_v p_v = 1. Multiplying every routed expert's down projection by G gives

    sum_v p_v * G * sum_g segment_g(x) + sum_k probs_k * b_down = routed(x) + b_down

and the shared experts add the neurons [0, S): the dense output exactly. A router `routing_scale` r
(DeepSeek-V3) multiplies the routed sum, so the routed down projections and bias are divided by r. A shared-expert gate
sigmoid(x @ w) starts at w = 0, i.e. 1/2, so the shared down projection is doubled to compensate.

Noise (`noise_std` > 0) adds N(0, (noise_std * std(w))^2) independently to every routed expert's
weights: it breaks the symmetry between identical experts at the price of exactness (the error grows
with noise_std; see docs/existing-projects.md for the recipes and their trade-offs).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from moe_plugin.convert.ffn import DenseFFN, is_silu
from moe_plugin.layers.mlp_experts import GroupedMLPExperts
from moe_plugin.layers.moe import MoE


def granularity(moe: MoE, dense: DenseFFN, name: str = "") -> int:
    """G = (F - S) / f, checked against the MoE's sizes; ValueError naming the knob to change."""
    F = dense.ffn_hidden_size
    S = shared_width(moe)
    f = moe.experts.ffn_hidden_size
    E, K = moe.num_experts, moe.top_k
    where = f" for '{name}'" if name else ""
    if moe.experts.hidden_size != dense.hidden_size:
        raise ValueError(
            f"upcycle{where}: the MoE's hidden_size={moe.experts.hidden_size} differs from the dense FFN's "
            f"input width {dense.hidden_size}."
        )
    if S >= F or (F - S) % f != 0:
        raise ValueError(
            f"upcycle{where}: the dense FFN has {F} hidden neurons; {S} go to shared experts and the rest "
            f"({F - S}) must split into whole experts of expert_hidden_size={f}. Choose expert_hidden_size "
            f"dividing {F - S} (e.g. {F - S} for plain upcycling, {(F - S) // 4} for granularity 4), or change "
            "num_shared_experts/shared_expert_hidden_size."
        )
    G = (F - S) // f
    if E % G != 0 or K % G != 0:
        raise ValueError(
            f"upcycle{where}: fine-grained upcycling with granularity {G} (= ({F} - {S}) / expert_hidden_size "
            f"{f}) needs num_experts and top_k to be multiples of {G} so that top-k always picks whole copies "
            f"of the dense FFN; got num_experts={E}, top_k={K}. Use top_k={G * max(1, K // G)} and num_experts="
            f"{G * max(1, E // G)}, or expert_hidden_size={F - S} for plain upcycling."
        )
    return G


def shared_width(moe: MoE) -> int:
    shared = moe.shared_experts
    return 0 if shared is None else int(shared.down_proj.in_features)


@torch.no_grad()
def upcycle_moe_(
    moe: MoE,
    dense: DenseFFN,
    noise_std: float = 0.0,
    router_std: float = 0.02,
    generator: torch.Generator | None = None,
    name: str = "",
) -> int:
    """Copy `dense` into `moe` in place (see the module docstring); returns the granularity G used."""
    G = granularity(moe, dense, name)
    E = moe.num_experts
    S = shared_width(moe)
    f = moe.experts.ffn_hidden_size
    experts = moe.experts
    if getattr(moe, "capacity_factor", None) is not None:
        warnings.warn(
            f"upcycle '{name}': capacity_factor={moe.capacity_factor} drops token copies beyond each expert's "
            "capacity, so tokens whose copies are dropped lose part of the dense output. Use capacity_factor=None "
            "(dropless) for an exact start.",
            stacklevel=3,
        )
    if not getattr(moe.router, "norm_topk_prob", True):
        warnings.warn(
            f"upcycle '{name}': norm_topk_prob=False, so the output right after upcycling is the dense output "
            "scaled by each token's top-k score mass, not equal to it. Set norm_topk_prob=True for an exact start.",
            stacklevel=3,
        )

    # Routed experts: expert e <- segment e mod G of neurons [S, F), down projection scaled by G.
    seg_E = torch.arange(E) % G
    cols_Ef = S + seg_E[:, None] * f + torch.arange(f)[None, :]
    _copy(experts.w_up_EDF, dense.w_up_DF[:, cols_Ef].permute(1, 0, 2))
    # A routing scale (DeepSeek-V3's routed_scaling_factor) multiplies the combined output: divide it out.
    scale = G / float(getattr(moe.router, "routing_scale", 1.0))
    _copy(experts.w_down_EFD, dense.w_down_FD[cols_Ef] * scale)
    if dense.gated:
        _copy(experts.w_gate_EDF, dense.w_gate_DF[:, cols_Ef].permute(1, 0, 2))
    for attr, b in (("b_up_EF", dense.b_up_F), ("b_gate_EF", dense.b_gate_F)):
        if b is not None:
            _copy(getattr(experts, attr), b[cols_Ef])
    for attr, b in (("b_up_EF", dense.b_up_F), ("b_gate_EF", dense.b_gate_F), ("b_down_ED", dense.b_down_D)):
        if b is None and getattr(experts, attr, None) is not None:
            getattr(experts, attr).zero_()  # a bias the dense FFN lacks is 0 (memory may be from to_empty)
    if dense.b_down_D is not None:
        # Each token's top-k weights sum to 1, so giving every expert the full bias adds it exactly once.
        _copy(experts.b_down_ED, dense.b_down_D.expand(E, -1) * (scale / G))
    if noise_std > 0:
        for p in experts.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) * noise_std * p.std())

    # Router: rows tied within each virtual group (a no-op constraint when G == 1).
    w_ED = moe.router.weight
    rows_VD = torch.randn(E // G, w_ED.shape[1], generator=generator) * router_std
    _copy(w_ED, rows_VD.repeat_interleave(G, dim=0))

    if moe.shared_experts is not None:
        _upcycle_shared(moe, dense, S, name)
    return G


def _upcycle_shared(moe: MoE, dense: DenseFFN, S: int, name: str) -> None:
    if not (dense.gated and is_silu(dense.activation) and not dense.has_bias):
        raise ValueError(
            f"upcycle '{name}': shared experts are SwiGLU without biases, so they can only hold part of a "
            "dense SwiGLU FFN without biases; this FFN is "
            f"{'gated' if dense.gated else 'not gated'} with activation {type(dense.activation).__name__} "
            f"and {'biases' if dense.has_bias else 'no biases'}. Set num_shared_experts=0."
        )
    shared = moe.shared_experts
    scale = 1.0
    if moe.shared_expert_gate is not None:
        # sigmoid(x @ 0) = 1/2 for every token: a constant the doubled down projection cancels.
        moe.shared_expert_gate.weight.zero_()
        scale = 2.0
    _copy(shared.gate_proj.weight, dense.w_gate_DF[:, :S].t())
    _copy(shared.up_proj.weight, dense.w_up_DF[:, :S].t())
    _copy(shared.down_proj.weight, dense.w_down_FD[:S].t() * scale)


def _copy(dst: torch.Tensor | None, src: torch.Tensor) -> None:
    if dst is None:
        raise ValueError("upcycle: the MoE's experts lack a parameter the dense FFN has (gate or bias).")
    if dst.shape != src.shape:
        raise ValueError(f"upcycle: shape mismatch, expert parameter {tuple(dst.shape)} vs dense {tuple(src.shape)}.")
    dst.copy_(src.to(dtype=dst.dtype, device=dst.device))


def is_swiglu(dense_gated: bool, activation: nn.Module | None, bias: bool) -> bool:
    """Whether the MoE's own `GroupedExperts` (SwiGLU, no bias, grouped-matmul path) computes this FFN."""
    return dense_gated and not bias and (activation is None or is_silu(activation))


def mlp_experts_for(
    num_experts: int,
    hidden_size: int,
    expert_hidden_size: int,
    gated: bool,
    activation: nn.Module | None,
    bias: bool,
    grouped_mm_backend: str = "auto",
) -> GroupedMLPExperts:
    """Experts that compute a non-SwiGLU dense FFN's function (its activation, gating and biases)."""
    return GroupedMLPExperts(
        num_experts,
        hidden_size,
        expert_hidden_size,
        activation,
        gated=gated,
        bias=bias,
        grouped_mm_backend=grouped_mm_backend,
    )


@torch.no_grad()
def max_abs_diff(dense_module: nn.Module, moe: MoE, num_tokens: int = 16, seed: int = 0) -> tuple[float, float]:
    """(max |dense(x) - moe(x)|, max |dense(x)|) on random tokens, both modules in eval mode.

    Used right after conversion to prove the upcycled layer reproduces the FFN it replaced; catches an
    FFN whose forward does more than `down(act(...))` (a residual, a scale, a different activation).
    """
    p = next(moe.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, moe.experts.hidden_size, generator=g).to(device=p.device, dtype=p.dtype)
    modes = (dense_module.training, moe.training)
    dense_module.eval()
    moe.eval()
    try:
        ref = dense_module(x)
        out = moe(x)
    finally:
        dense_module.train(modes[0])
        moe.train(modes[1])
        # The probe is not a training step: leave no aux loss or load statistics behind.
        moe.aux_loss = None
        moe.stats.clear()
    return float((out - ref).abs().max()), float(ref.abs().max())
