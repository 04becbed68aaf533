"""Top-k token router: softmax or sigmoid scores, optional expert bias, group limit, jitter, warmup.

Shapes: T tokens, D hidden, E experts, K experts per token, G expert groups.

    x_TD        <- x_TD * U(1 - jitter, 1 + jitter)          (training only; Switch Transformer jitter)
    logits_TE    = x_TD @ W_gate_ED^T                        (float32, whatever the model dtype)
    logits_TE   <- warmup(logits_TE)                         (Stochastic Routing Warmup, routing_warmup.py)
    scores_TE    = softmax(logits_TE)                        (Ling, Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2)
                 | sigmoid(logits_TE)                        (DeepSeek-V3)
    select_TE    = scores_TE + bias_E                        (aux-loss-free balancing; bias for selection only)
    select_TE   <- mask all but the top `topk_groups` of G groups, group score = sum of its top-2 select
                                                             (group-limited routing, DeepSeek-V3)
    topk_ids_TK  = topk(select_TE, K)
    probs_TK     = scores_TE[topk_ids_TK]                    (the bias never enters the combine weights)
    probs_TK    /= probs_TK.sum(-1)                          (when norm_topk_prob, as in Ling's released code)
    probs_TK    *= routing_scale                             (DeepSeek-V3 routed_scaling_factor)

Vocabulary (whole package): `logits` are the router output, `scores` the normalised scores over all
experts, `probs` the top-k weights used to combine expert outputs, `topk_ids` the chosen experts.

The expert bias is a buffer (checkpointed, not optimised). It is updated outside the forward by the sign
rule of Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing"), see expert_bias.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_plugin.layers.routing_warmup import StochasticRoutingWarmup

SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass
class RouterOutput:
    logits_TE: torch.Tensor  # learned router logits (before warmup), float32
    scores_TE: torch.Tensor  # scores used for routing (after warmup), float32
    probs_TK: torch.Tensor  # combine weights, float32
    topk_ids_TK: torch.Tensor  # chosen experts (global ids), int64


class TopKRouter(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool = True,
        score_func: str = "softmax",
        routing_scale: float = 1.0,
        num_expert_groups: int = 1,
        topk_groups: int = 1,
        expert_bias: bool = False,
        jitter: float = 0.0,
        routing_warmup_steps: int | None = None,
        routing_warmup_momentum: float = 0.99,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}.")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={score_func!r} must be one of {SCORE_FUNCS}.")
        if num_expert_groups < 1 or num_experts % num_expert_groups:
            raise ValueError(
                f"num_expert_groups={num_expert_groups} must be >= 1 and divide num_experts={num_experts}."
            )
        if not 1 <= topk_groups <= num_expert_groups:
            raise ValueError(f"topk_groups={topk_groups} must be between 1 and num_expert_groups={num_expert_groups}.")
        if num_expert_groups > 1 and top_k > topk_groups * (num_experts // num_expert_groups):
            raise ValueError(
                f"top_k={top_k} exceeds the experts in the {topk_groups} selected groups "
                f"({topk_groups} x {num_experts // num_expert_groups}); raise topk_groups."
            )
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"router_jitter={jitter} must be in [0, 1).")
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.score_func = score_func
        self.routing_scale = routing_scale
        self.num_expert_groups = num_expert_groups
        self.topk_groups = topk_groups
        self.jitter = jitter
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.expert_bias_E: torch.Tensor | None
        if expert_bias:
            self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias_E = None
        self.warmup = (
            StochasticRoutingWarmup(num_experts, routing_warmup_steps, routing_warmup_momentum)
            if routing_warmup_steps is not None
            else None
        )

    def forward(self, x_TD: torch.Tensor, tokens_per_sample: int | None = None) -> RouterOutput:
        """tokens_per_sample: S when x_TD is a flattened [B, S] batch (the warmup noise is keyed by token position)."""
        # Routing decisions are made in float32 even under mixed precision: autocast would otherwise run
        # the gate projection in bf16/fp16 although the inputs were cast up.
        with torch.autocast(x_TD.device.type, enabled=False):
            return self._route(x_TD.float(), tokens_per_sample)

    def _route(self, x_TD: torch.Tensor, tokens_per_sample: int | None = None) -> RouterOutput:
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits_TE = F.linear(x_TD, self.weight.float())
        routed_TE = self.warmup(logits_TE, tokens_per_sample) if self.warmup is not None else logits_TE
        if self.score_func == "softmax":
            scores_TE = torch.softmax(routed_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(routed_TE)

        if self.expert_bias_E is None and self.num_expert_groups == 1:
            probs_TK, topk_ids_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        else:
            select_TE = scores_TE.detach()
            if self.expert_bias_E is not None:
                select_TE = select_TE + self.expert_bias_E
            if self.num_expert_groups > 1:
                select_TE = self._limit_to_top_groups(select_TE)
            topk_ids_TK = torch.topk(select_TE, self.top_k, dim=-1).indices
            probs_TK = scores_TE.gather(1, topk_ids_TK)
        if self.norm_topk_prob:
            probs_TK = probs_TK / probs_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.routing_scale != 1.0:
            probs_TK = probs_TK * self.routing_scale
        return RouterOutput(logits_TE, scores_TE, probs_TK, topk_ids_TK)

    def _limit_to_top_groups(self, select_TE: torch.Tensor) -> torch.Tensor:
        """Keep the experts of the `topk_groups` best groups; the others get -inf (DeepSeek-V3)."""
        T, E = select_TE.shape
        select_TGe = select_TE.view(T, self.num_expert_groups, E // self.num_expert_groups)
        group_scores_TG = select_TGe.topk(min(2, select_TGe.shape[-1]), dim=-1).values.sum(dim=-1)
        top_groups_TG = group_scores_TG.topk(self.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
        return select_TGe.masked_fill(~keep_TG[:, :, None], float("-inf")).view(T, E)
