"""Auxiliary-loss-free load balancing: the expert-bias update rule (Wang et al. 2024, arXiv 2408.15664;
DeepSeek-V3 section 2.1.2).

Shapes: E experts.

A per-expert bias b_E is added to the router scores for top-k selection only (router.py). After each
optimizer step's forward passes, with c_E the tokens routed to each expert over the whole step (all
gradient-accumulation micro-batches, summed over data-parallel ranks so every rank computes the same
update):

    b_E <- b_E + rate * sign(mean(c) - c_E)          then centred:  b_E <- b_E - mean(b_E)

Overloaded experts are pushed down, underloaded ones up. Centring (as torchtitan does) keeps the bias
bounded and changes no selection, since top-k is invariant to a common shift. The rate is the paper's u
(1e-3). The update is applied by the `RouterUpdates` callback (lightning/callbacks/router_updates.py)
from `on_before_optimizer_step`; this file holds only the math.
"""

from __future__ import annotations

import torch


def expert_bias_delta(tokens_per_expert_E: torch.Tensor, rate: float) -> torch.Tensor:
    """The centred sign-rule step for one layer: rate * sign(mean(c) - c), minus its mean."""
    counts_E = tokens_per_expert_E.float()
    delta_E = rate * torch.sign(counts_E.mean() - counts_E)
    return delta_E - delta_E.mean()


@torch.no_grad()
def update_expert_bias(expert_bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
    """In-place b_E += expert_bias_delta(c_E, rate)."""
    expert_bias_E.add_(expert_bias_delta(tokens_per_expert_E, rate).to(expert_bias_E))
