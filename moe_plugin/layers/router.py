"""Top-k token router.

Shapes: T tokens, D hidden, E experts, K experts per token.

    logits_TE = x_TD @ W_gate_ED^T           (float32, whatever the model dtype)
    scores_TE = softmax(logits_TE)           (Ling, Mixtral, Qwen-MoE, OLMoE)
    probs_TK, topk_ids_TK = topk(scores_TE, K)
    probs_TK /= probs_TK.sum(-1)             (when norm_topk_prob, as in Ling's released code)

The vocabulary is shared by the whole package: `logits` are the router output, `scores` the
normalised scores over all experts, `probs` the top-k weights used to combine expert outputs,
`topk_ids` the chosen experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    logits_TE: torch.Tensor
    scores_TE: torch.Tensor
    probs_TK: torch.Tensor
    topk_ids_TK: torch.Tensor


class TopKRouter(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}.")
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = torch.softmax(logits_TE, dim=-1)
        probs_TK, topk_ids_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            probs_TK = probs_TK / probs_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return RouterOutput(logits_TE, scores_TE, probs_TK, topk_ids_TK)
