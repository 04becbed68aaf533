"""Stochastic Routing Warmup (Ling, arXiv 2503.05139, section "Stochastic Routing Warmup").

Shapes: T tokens, E experts.

For training step i (the optimizer step count, set from outside with `set_step`) and W warmup steps:

    a        = min(i / W, 1)
    s'_TE    = a * s_TE + (1 - a) * (mu + sigma * eps_TE),      eps_TE ~ N(0, I)

s are the router logits, mu / sigma the running mean and standard deviation of all logits (over tokens
and experts), tracked with an exponential moving average (momentum m, per training forward):

    mu    <- m * mu    + (1 - m) * mean(s)          (first batch: mu = mean(s), sigma = std(s))
    sigma <- m * sigma + (1 - m) * std(s)

The statistics are scalars on purpose: the random part must be identically distributed across experts,
otherwise a router that starts (or drifts) with a per-expert offset would keep routing to the same
experts during warmup (tests/unit/layers/test_routing_warmup.py shows per-expert statistics failing).

At step 0 routing is random at the logits' own scale, so expert load is balanced and a hot expert
cannot exhaust memory in dropless mode; control then moves linearly to the learned router. From step W
on (and in eval mode) the learned logits are returned unchanged, bit for bit. The paper leaves W and the
statistics' granularity open: W is required, statistics are scalars, m defaults to 0.99.

Why the step is set from outside: a layer cannot tell optimizer steps from gradient-accumulation
micro-batches or activation-checkpoint recomputation. The `RouterUpdates` callback (lightning/callbacks/router_updates.py)
calls `moe_start_step(model, trainer.global_step)` (MoE.start_step -> set_step) before every batch; the step is a buffer, so it is
checkpointed and resumes correctly.
"""

from __future__ import annotations

import torch
from torch import nn


def in_backward() -> bool:
    """True while autograd runs a backward pass, where activation checkpointing recomputes forwards."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class StochasticRoutingWarmup(nn.Module):
    def __init__(self, num_experts: int, warmup_steps: int, momentum: float = 0.99) -> None:
        super().__init__()
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(
                f"routing_warmup_steps={warmup_steps!r} must be a positive integer when the routing warmup is on "
                "(the paper's W); set e.g. model.moe.routing_warmup_steps=100, or routing_warmup=false."
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"routing_warmup_momentum={momentum} must be in [0, 1).")
        self.warmup_steps = warmup_steps
        self.momentum = momentum
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.num_experts = num_experts
        self.register_buffer("logit_mean", torch.zeros(()))
        self.register_buffer("logit_std", torch.ones(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # Host copy of `step`, so that the forward does not read a device tensor (a sync on accelerators).
        self._step_host: int | None = None

    def set_step(self, step: int) -> None:
        self.step.fill_(int(step))
        self._step_host = int(step)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._step_host = None  # re-read the restored buffer on next use

    def blend(self) -> float:
        """a = min(i / W, 1)."""
        if self._step_host is None:
            self._step_host = int(self.step)
        return min(self._step_host / self.warmup_steps, 1.0)

    @torch.no_grad()
    def _update_stats(self, logits_TE: torch.Tensor) -> None:
        if logits_TE.numel() < 2:
            return
        mean, std = logits_TE.mean(), logits_TE.std()
        if int(self.num_updates) == 0:
            self.logit_mean.copy_(mean)
            self.logit_std.copy_(std)
        else:
            self.logit_mean.lerp_(mean, 1.0 - self.momentum)
            self.logit_std.lerp_(std, 1.0 - self.momentum)
        self.num_updates += 1

    def forward(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return logits_TE
        a = self.blend()
        if a >= 1.0:
            return logits_TE
        if not in_backward():  # a checkpoint recompute reuses the statistics its forward produced
            self._update_stats(logits_TE.detach())
        noise_TE = torch.randn_like(logits_TE)
        random_TE = self.logit_mean + self.logit_std * noise_TE
        return a * logits_TE + (1.0 - a) * random_TE

    def extra_repr(self) -> str:
        return f"warmup_steps={self.warmup_steps}, momentum={self.momentum}"
