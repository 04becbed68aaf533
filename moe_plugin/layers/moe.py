"""Mixture-of-Experts feed-forward layer.

Shapes: T tokens, D hidden, E experts, K experts per token, N = T*K token copies.

forward(x) reads like the algorithm:
    1. route:    router(x_TD) -> scores_TE, probs_TK, topk_ids_TK
    2. permute:  group token copies by expert id -> x_ND, tokens_per_expert_E
    3. dispatch: hand copies to the ranks that hold their experts (identity without expert parallelism)
    4. experts:  run each expert's SwiGLU on its copies
    5. combine:  bring outputs back (inverse of 3), weight by probs and sum per token (inverse of 2)
    6. shared:   add the shared experts' output (optionally gated by sigmoid(x @ w_shared_gate))

Auxiliary losses (coefficient-weighted load-balancing loss and router z-loss) are kept on the layer
after each forward in `aux_loss`; `collect_aux_losses(model)` sums them over a model. Cheap routing
statistics of the last forward are kept in `last_tokens_per_expert_E` (detached).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from moe_plugin.layers.experts import GroupedExperts
from moe_plugin.layers.feed_forward import FeedForward
from moe_plugin.layers.losses import load_balancing_loss, router_z_loss
from moe_plugin.layers.permute import permute, unpermute
from moe_plugin.layers.router import TopKRouter


class TokenDispatcher(Protocol):
    """Moves expert-sorted token copies to the experts' owners and back (see moe_plugin.dispatch)."""

    def dispatch(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the copies for this rank's local experts and the count per local expert."""
        ...

    def combine(self, y_local: torch.Tensor) -> torch.Tensor:
        """Inverse of the last dispatch: outputs back in the caller's expert-sorted order."""
        ...


class MoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int = 8,
        top_k: int = 2,
        expert_hidden_size: int = 512,
        num_shared_experts: int = 0,
        shared_expert_hidden_size: int | None = None,
        shared_expert_gate: bool = False,
        norm_topk_prob: bool = True,
        aux_loss_coef: float = 0.015,
        z_loss_coef: float = 1e-4,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.router = TopKRouter(hidden_size, num_experts, top_k, norm_topk_prob=norm_topk_prob)
        self.experts = GroupedExperts(num_experts, hidden_size, expert_hidden_size)
        # Several shared experts are one SwiGLU MLP of summed width (DeepSeekMoE, Ling).
        shared_width = num_shared_experts * (shared_expert_hidden_size or expert_hidden_size)
        self.shared_experts = FeedForward(hidden_size, shared_width) if num_shared_experts > 0 else None
        self.shared_expert_gate = (
            nn.Linear(hidden_size, 1, bias=False) if (shared_expert_gate and self.shared_experts) else None
        )
        self.dispatcher: TokenDispatcher | None = None
        # set from outside (moe_plugin.parallel): sums token counts over data-parallel ranks, so the balance
        # loss and statistics are those of the global micro-batch; None = this process's counts
        self.count_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.aux_loss: torch.Tensor | None = None
        self.last_losses: dict[str, torch.Tensor] = {}
        self.last_tokens_per_expert_E: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])

        routing = self.router(x_TD)
        x_ND, tokens_per_expert_E, state = permute(x_TD, routing.topk_ids_TK, self.num_experts)
        if self.dispatcher is not None:
            x_local, tokens_per_local_expert = self.dispatcher.dispatch(x_ND, tokens_per_expert_E)
            y_ND = self.dispatcher.combine(self.experts(x_local, tokens_per_local_expert))
        else:
            y_ND = self.experts(x_ND, tokens_per_expert_E)
        out_TD = unpermute(y_ND, routing.probs_TK, state)

        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD

        self._record(routing.logits_TE, routing.scores_TE, routing.topk_ids_TK, tokens_per_expert_E)
        return out_TD.reshape(shape)

    def _record(
        self,
        logits_TE: torch.Tensor,
        scores_TE: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
    ) -> None:
        if self.count_reduce is not None:
            tokens_per_expert_E = self.count_reduce(tokens_per_expert_E)
        balance = load_balancing_loss(scores_TE, tokens_per_expert_E)
        z = router_z_loss(logits_TE)
        self.last_losses = {"balance_loss": balance.detach(), "z_loss": z.detach()}
        self.aux_loss = self.aux_loss_coef * balance + self.z_loss_coef * z
        self.last_tokens_per_expert_E = tokens_per_expert_E.detach()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def collect_aux_losses(model: nn.Module) -> torch.Tensor | None:
    """Sum of the coefficient-weighted auxiliary losses of every MoE layer's last forward."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
