"""Parameter and FLOP accounting for decoder MoE models.

"Activated" parameters (Ling report, DeepSeekMoE): every non-expert parameter (embeddings, LM head,
attention, norms, routers, shared experts, dense FFNs) plus top_k of the num_experts routed experts in
each MoE layer.

Training FLOPs per token (forward + backward, PaLM appendix B convention):
    6 * (activated params - input embedding params) + 12 * n_layers * n_heads * head_dim * seq_len
The first term is the matmuls (2 FLOPs per multiply-add, x3 for forward + backward); the second is the
attention scores and weighted sum, counted over the full (not causally halved) sequence. The input
embedding is a lookup, not a matmul.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moe_plugin.layers.attention import Attention
from moe_plugin.layers.moe import MoE


@dataclass
class ParamCounts:
    total: int
    active: int
    embedding: int
    components: dict[str, int] = field(default_factory=dict)  # total params per component
    active_components: dict[str, int] = field(default_factory=dict)


def _component(name: str) -> str:
    if name.startswith("embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    for key, comp in (
        (".attention.", "attention"),
        (".router.", "router"),
        (".experts.", "routed_experts"),
        (".shared_expert_gate.", "shared_experts"),
        (".shared_experts.", "shared_experts"),
        ("norm", "norms"),
        (".ffn.", "dense_ffn"),
    ):
        if key in f".{name}":
            return comp
    return "other"


def count_parameters(model: nn.Module) -> ParamCounts:
    """Total and activated parameter counts, works on meta-device models (counts shapes only)."""
    components: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        comp = _component(name)
        components[comp] = components.get(comp, 0) + p.numel()
    active_components = dict(components)
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            routed = sum(p.numel() for p in m.experts.parameters())
            inactive += routed - routed * m.top_k // m.num_experts
    if "routed_experts" in active_components:
        active_components["routed_experts"] -= inactive
    total = sum(components.values())
    return ParamCounts(total, total - inactive, components.get("embedding", 0), components, active_components)


def attention_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """12 * n_layers * n_heads * head_dim * seq_len (forward + backward)."""
    return sum(12 * m.num_heads * m.head_dim * seq_len for m in model.modules() if isinstance(m, Attention))


def flops_per_token(model: nn.Module, seq_len: int, include_attention: bool = True) -> int:
    """Training (forward + backward) FLOPs per token; see the module docstring."""
    counts = count_parameters(model)
    dense = 6 * (counts.active - counts.embedding)
    return dense + (attention_flops_per_token(model, seq_len) if include_attention else 0)
