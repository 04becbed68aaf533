"""Causal self-attention with grouped-query heads (GQA), RoPE, optional q/k/v bias, optional q/k RMSNorm, and
a key/value cache for generation.

Shapes: B batch, S new positions, P cached (past) positions, D hidden, H query heads, G key/value heads,
Dh head dim. MHA is G == H; MQA is G == 1.

    q, k, v = x @ Wq (+ bq), x @ Wk (+ bk), x @ Wv (+ bv)          bias: Qwen2-MoE (`bias=True`)
    qk_norm_type="head": q, k = RMSNorm_Dh(q_h), RMSNorm_Dh(k_h)    per head, after the split (Qwen3-MoE)
    qk_norm_type="full": q, k = RMSNorm_{H*Dh}(q), RMSNorm_{G*Dh}(k) over the whole projection (OLMoE)
    q, k = rope(q), rope(k);  out = softmax(q k^T / sqrt(Dh) + causal) v;  y = out @ Wo

With a `KVCache`, the keys and values of earlier positions are kept, so a decoding step computes only the
new positions; the caller passes the RoPE tables of those positions (offset by the cached length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_plugin.layers.norm import RMSNorm
from moe_plugin.layers.rope import apply_rope

QK_NORM_TYPES = ("head", "full")


class KVCache:
    """Keys and values of the positions seen so far, one (k_BGPDh, v_BGPDh) pair per attention layer.

    Grows by concatenation: simple and exact (decoding on CPU is dominated by the MoE layers, not the copy).
    """

    def __init__(self, num_layers: int) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        """Number of cached positions (0 before the first forward)."""
        first = self.layers[0] if self.layers else None
        return 0 if first is None else first[0].shape[2]

    def update(self, layer: int, k_BGSDh: torch.Tensor, v_BGSDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions of `layer` and return all its keys and values [B, G, P + S, Dh]."""
        past = self.layers[layer]
        if past is not None:
            k_BGSDh = torch.cat([past[0], k_BGSDh], dim=2)
            v_BGSDh = torch.cat([past[1], v_BGSDh], dim=2)
        self.layers[layer] = (k_BGSDh, v_BGSDh)
        return k_BGSDh, v_BGSDh


class Attention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        bias: bool = False,
        norm_eps: float = 1e-6,
        qk_norm_type: str = "head",
        layer_index: int = 0,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}: "
                "grouped-query attention needs each key/value head to serve a whole group of query heads."
            )
        if qk_norm_type not in QK_NORM_TYPES:
            raise ValueError(
                f"model.qk_norm_type={qk_norm_type!r} must be one of {QK_NORM_TYPES}: 'head' normalises each head "
                "(Qwen3-MoE), 'full' the whole q and k projections before the head split (OLMoE)."
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.qk_norm_type = qk_norm_type
        self.layer_index = layer_index  # which slot of a KVCache this layer uses
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        full = qk_norm_type == "full"
        q_width = num_heads * self.head_dim if full else self.head_dim
        k_width = num_kv_heads * self.head_dim if full else self.head_dim
        self.q_norm = RMSNorm(q_width, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(k_width, norm_eps) if qk_norm else None

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_SDh: torch.Tensor,
        sin_SDh: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSX, k_BSX, v_BSX = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        full_norm = self.q_norm is not None and self.qk_norm_type == "full"
        if full_norm:
            q_BSX, k_BSX = self.q_norm(q_BSX), self.k_norm(k_BSX)  # type: ignore[misc]
        q_BHSDh = q_BSX.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGSDh = k_BSX.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGSDh = v_BSX.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None and not full_norm:
            q_BHSDh, k_BGSDh = self.q_norm(q_BHSDh), self.k_norm(k_BGSDh)
        q_BHSDh = apply_rope(q_BHSDh, cos_SDh, sin_SDh)
        k_BGSDh = apply_rope(k_BGSDh, cos_SDh, sin_SDh)
        if cache is not None:
            k_BGSDh, v_BGSDh = cache.update(self.layer_index, k_BGSDh, v_BGSDh)
        P = k_BGSDh.shape[2] - S  # cached positions before this call
        gqa = self.num_kv_heads != self.num_heads
        if P == 0:
            out_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, is_causal=True, enable_gqa=gqa)
        else:
            # SDPA's is_causal aligns the mask top-left; with P cached positions query i sees keys 0..P+i.
            mask_SK = torch.ones(S, P + S, dtype=torch.bool, device=x_BSD.device).tril(diagonal=P)
            out_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, attn_mask=mask_SK, enable_gqa=gqa)
        return self.o_proj(out_BHSDh.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))
