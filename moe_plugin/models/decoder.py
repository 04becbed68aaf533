"""A Ling-style decoder-only MoE language model.

Shapes: B batch, S sequence, D hidden, V vocabulary.

Each block: x + attn(norm(x)), then h + ffn(norm(h)), with ffn an MoE layer except in the first
`first_k_dense` blocks (DeepSeekMoE), which use a dense SwiGLU of width `dense_ffn_hidden_size`.
Open MoE families are expressed by arguments alone:
- Ling:        shared experts, softmax top-k renormalised, NormHead, untied embeddings.
- Mixtral:     num_shared_experts=0, norm_topk_prob=True.
- Qwen-MoE:    one shared expert with shared_expert_gate=True, norm_topk_prob=False.
- Qwen2-MoE:   as Qwen-MoE, plus attention_bias=True (q/k/v bias).
- Qwen3-MoE:   qk_norm=True (per head, qk_norm_type="head"), no shared experts.
- OLMoE:       qk_norm=True with qk_norm_type="full" (over the whole projection), no shared experts, untied.
- DeepSeekMoE: several shared experts, first_k_dense > 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from moe_plugin.layers.attention import Attention, KVCache
from moe_plugin.layers.feed_forward import FeedForward
from moe_plugin.layers.moe import MoE
from moe_plugin.layers.norm import RMSNorm
from moe_plugin.layers.norm_head import NormHead
from moe_plugin.layers.rope import rope_cos_sin


def _plain(value: Any) -> Any:
    """Dicts, lists and scalars only (what torch.load(weights_only=True) and JSON accept)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class DecoderBlock(nn.Module):
    def __init__(self, attention: Attention, ffn: nn.Module, hidden_size: int, norm_eps: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(hidden_size, norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(hidden_size, norm_eps)
        self.ffn = ffn

    def forward(
        self, x_BSD: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        h_BSD = x_BSD + self.attention(self.attn_norm(x_BSD), cos_SDh, sin_SDh, cache)
        return h_BSD + self.ffn(self.ffn_norm(h_BSD))


class MoEDecoderLM(nn.Module):
    # config validation checks `model.moe.*` against MoE's constructor
    NESTED_KWARGS = {"moe": MoE}

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        qk_norm_type: str = "head",
        attention_bias: bool = False,
        rope_theta: float = 10000.0,
        max_seq_len: int = 4096,
        norm_eps: float = 1e-6,
        tie_embeddings: bool = False,
        norm_head: bool = False,
        first_k_dense: int = 0,
        dense_ffn_hidden_size: int | None = None,
        moe: dict[str, Any] | None = None,
        init_std: float = 0.02,
        activation_checkpointing: str = "none",
        activation_checkpointing_target: str = "blocks",
        activation_checkpointing_every: int = 1,
        compile: bool = False,
    ) -> None:
        super().__init__()
        # The constructor arguments, so that a checkpoint can carry the model's config (MoELanguageModule saves
        # it as checkpoint["model_config"]) and converters rebuild the same model from it.
        self.init_kwargs: dict[str, Any] = _plain(
            {k: v for k, v in locals().items() if k not in ("self", "__class__") and not k.startswith("_")}
        )
        if norm_head and tie_embeddings:
            raise ValueError(
                "model.norm_head=true cannot be combined with model.tie_embeddings=true: NormHead rescales "
                "the head weight, which would rescale the embeddings too. Set one of them to false."
            )
        if not 0 <= first_k_dense <= num_layers:
            raise ValueError(f"model.first_k_dense={first_k_dense} must be between 0 and num_layers={num_layers}.")
        moe_kwargs = dict(moe or {})
        if first_k_dense > 0 and dense_ffn_hidden_size is None:
            raise ValueError("model.first_k_dense > 0 needs model.dense_ffn_hidden_size (width of the dense FFN).")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.head_dim = head_dim or hidden_size // num_heads
        self.rope_theta = rope_theta
        self.max_seq_len = max_seq_len
        self.init_std = init_std
        # training settings recorded here, applied from outside by moe_plugin.parallel.recompute (no model math)
        self.activation_checkpointing = activation_checkpointing
        self.activation_checkpointing_target = activation_checkpointing_target
        self.activation_checkpointing_every = activation_checkpointing_every
        # A request for the training glue (lightning/run.py -> parallel/compile.py compiles each block);
        # the model itself never calls torch.compile.
        self.compile_requested = compile

        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        blocks = []
        for i in range(num_layers):
            attention = Attention(
                hidden_size,
                num_heads,
                num_kv_heads,
                self.head_dim,
                qk_norm,
                bias=attention_bias,
                norm_eps=norm_eps,
                qk_norm_type=qk_norm_type,
                layer_index=i,
            )
            if i < first_k_dense:
                ffn: nn.Module = FeedForward(hidden_size, dense_ffn_hidden_size)  # type: ignore[arg-type]
            else:
                ffn = MoE(hidden_size, **moe_kwargs)
            blocks.append(DecoderBlock(attention, ffn, hidden_size, norm_eps))
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(hidden_size, norm_eps)
        if norm_head:
            self.lm_head: nn.Module = NormHead(hidden_size, vocab_size)
        else:
            self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
            if tie_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-style init: N(0, init_std) for embeddings and projections, scaled on residual outputs."""
        for name, p in self.named_parameters():
            if p.dim() < 2 or p.is_meta:
                continue
            self.init_parameter_(name, p)

    @torch.no_grad()
    def init_parameter_(self, name: str, p: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initialise one parameter, or one expert's slice [1, ...] of a stacked expert weight, in place.

        N(0, init_std), and N(0, init_std / sqrt(2 * num_layers)) on residual outputs; vectors (norms, biases)
        keep their constructor values. moe_plugin.parallel.materialise calls it with a generator derived from
        the seed, the name and the global expert index (layout-independent init of a meta-device model).
        """
        if p.dim() < 2:
            return
        residual_std = self.init_std / (2 * self.num_layers) ** 0.5
        is_residual_out = name.endswith(("o_proj.weight", "down_proj.weight", "w_down_EFD"))
        nn.init.normal_(p, std=residual_std if is_residual_out else self.init_std, generator=generator)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for `forward(..., cache=...)` (generation)."""
        return KVCache(self.num_layers)

    def forward(self, input_ids_BS: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, S, V]. With `cache`, `input_ids_BS` are the positions after the cached ones."""
        S = input_ids_BS.shape[1]
        P = cache.seq_len if cache is not None else 0
        if P + S > self.max_seq_len:
            raise ValueError(f"sequence length {P + S} exceeds model.max_seq_len={self.max_seq_len}.")
        cos_SDh, sin_SDh = rope_cos_sin(P + S, self.head_dim, self.rope_theta, device=input_ids_BS.device)
        if P:
            cos_SDh, sin_SDh = cos_SDh[P:], sin_SDh[P:]
        x_BSD = self.embed_tokens(input_ids_BS)
        for block in self.layers:
            x_BSD = block(x_BSD, cos_SDh, sin_SDh, cache)
        return self.lm_head(self.norm(x_BSD))
