"""RouterUpdates: the step-level router updates that a layer cannot do itself.

Shapes: L MoE layers with an expert bias, E experts.

For any LightningModule containing MoE layers (found with `moe_layers(pl_module)`):
1. Before the first micro-batch of every optimizer step, `moe_start_step(pl_module, trainer.global_step)`:
   sets the Stochastic Routing Warmup step (so W counts optimizer steps, not micro-batches, and resumes
   from checkpoints) and opens a new tokens-per-expert window for the global-batch balance loss and the
   expert bias.
2. In `on_before_optimizer_step` (once per optimizer step, after all gradient-accumulation micro-batches),
   the aux-loss-free bias update (layers/expert_bias.py):
       c_LE = sum over micro-batches of the step and over all ranks (trainer.strategy.reduce, "sum")
       b_E <- b_E + rate * sign(mean(c) - c_E), centred
   Every rank reduces the same counts, so the bias stays identical on every rank.
   A step whose update the LossSpikeGuard rejected (the same decision on every rank) leaves the bias
   unchanged too: a skipped step changes no state. Place this callback after the guard.

Nothing happens for layers without warmup / bias, so it is safe to keep on by default.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.optim import Optimizer

from moe_plugin.layers.expert_bias import update_expert_bias
from moe_plugin.layers.moe import moe_layers, moe_start_step
from moe_plugin.lightning.callbacks.spike import update_rejected


class RouterUpdates(Callback):
    def __init__(self, expert_bias_update_rate: float | None = None) -> None:
        """expert_bias_update_rate: overrides every layer's own `expert_bias_update_rate` when set."""
        if expert_bias_update_rate is not None and expert_bias_update_rate < 0:
            raise ValueError(
                f"callbacks.router_updates.expert_bias_update_rate={expert_bias_update_rate} must be >= 0."
            )
        self.expert_bias_update_rate = expert_bias_update_rate
        self._step_open = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._step_open:
            moe_start_step(pl_module, trainer.global_step)
            self._step_open = True

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        self._step_open = False
        layers = [m for m in moe_layers(pl_module) if m.router.expert_bias_E is not None]
        if not layers or update_rejected(trainer):
            return
        counts = []
        for m in layers:
            c = m.stats.step_tokens_per_expert_E
            counts.append(torch.zeros(m.num_experts, device=m.router.expert_bias_E.device) if c is None else c.float())
        counts_LE = trainer.strategy.reduce(torch.stack(counts), reduce_op="sum")
        for m, c_E in zip(layers, counts_LE):
            rate = m.expert_bias_update_rate if self.expert_bias_update_rate is None else self.expert_bias_update_rate
            update_expert_bias(m.router.expert_bias_E, c_E, rate)

    def state_dict(self) -> dict[str, Any]:
        return {}
