"""RouterUpdates: the step-level router updates that a layer cannot do itself.

Shapes: L MoE layers with an expert bias, E experts.

For any LightningModule containing MoE layers (found with `moe_layers(pl_module)`):
1. Before the first micro-batch of every optimizer step, `moe_start_step(pl_module)`: opens a new
   tokens-per-expert window for the global-batch balance loss and the expert bias.
2. Before every micro-batch, the Stochastic Routing Warmup's noise keys (layers/routing_warmup.py): the
   run's seed and the global position of this rank's first sample in the step's batch,
       first_sample = m * G + rank * batch_size      (m-th micro-batch of the step; GlobalOrderSampler)
   so the same global batch gets the same routing noise on any layout.
3. In `on_before_optimizer_step` (once per optimizer step, after all gradient-accumulation micro-batches),
   `commit_routing_warmup`: the warmup's staged logit moments, summed over ranks, update its statistics
   and its step count (W counts accepted optimizer steps) only if the update is applied; then
   the aux-loss-free bias update (layers/expert_bias.py):
       c_LE = sum over micro-batches of the step and over all ranks (trainer.strategy.reduce, "sum")
       b_E <- b_E + rate * sign(mean(c) - c_E), centred
   Every rank reduces the same counts, so the bias stays identical on every rank.
   A step whose update the LossSpikeGuard rejected (the same decision on every rank) leaves the bias
   unchanged too, and so does the routing warmup: a skipped step changes no state, and its retry routes
   like a clean step. `setup` refuses a callbacks list with this callback before the guard.

Nothing happens for layers without warmup / bias, so it is safe to keep on by default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from moe_plugin.data.sampler import GlobalOrderSampler
from moe_plugin.layers.expert_bias import update_expert_bias
from moe_plugin.layers.moe import moe_layers, moe_start_step
from moe_plugin.layers.routing_warmup import NoiseKeys, commit_routing_warmup, routing_warmups, set_noise_keys
from moe_plugin.lightning.callbacks.spike import LossSpikeGuard, update_rejected


class RouterUpdates(Callback):
    def __init__(self, expert_bias_update_rate: float | None = None, seed: int | None = None) -> None:
        """expert_bias_update_rate: overrides every layer's own `expert_bias_update_rate` when set.
        seed: key of the routing-warmup noise (None: the seed given to seed_everything, else 0)."""
        if expert_bias_update_rate is not None and expert_bias_update_rate < 0:
            raise ValueError(
                f"callbacks.router_updates.expert_bias_update_rate={expert_bias_update_rate} must be >= 0."
            )
        self.expert_bias_update_rate = expert_bias_update_rate
        self.seed = seed
        self._step_open = False
        self._micro_batch = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # update_rejected() is only valid after the guard's on_before_optimizer_step ran for this step
        cbs = list(trainer.callbacks)
        guards = [i for i, c in enumerate(cbs) if isinstance(c, LossSpikeGuard)]
        if guards and any(c is self for c in cbs) and cbs.index(self) < guards[-1]:
            raise ValueError(
                "RouterUpdates is listed before LossSpikeGuard in the Trainer's callbacks, so it would update the "
                "routing warmup and expert bias before the guard decides to reject a step. List the guard first "
                "(conf/callbacks/default.yaml does: spike before router_updates)."
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._step_open:
            moe_start_step(pl_module)
            self._step_open = True
            self._micro_batch = 0
        if routing_warmups(pl_module):
            set_noise_keys(pl_module, self._noise_keys(trainer, batch))
        self._micro_batch += 1

    def _noise_keys(self, trainer: Trainer, batch: Any) -> NoiseKeys:
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, GlobalOrderSampler):
            first = sampler.first_sample(self._micro_batch)
        else:  # another sampler: contiguous shares in rank order assumed (exact per layout, not across layouts)
            try:
                bs = extract_batch_size(batch)
            except MisconfigurationException:  # no tensor in the batch
                bs = 1
            first = (self._micro_batch * trainer.world_size + trainer.global_rank) * bs
        return NoiseKeys(seed=seed, first_sample=first, reduce=_sum_over_ranks(trainer))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        self._step_open = False
        if routing_warmups(pl_module):
            commit_routing_warmup(
                pl_module,
                accepted=not update_rejected(trainer),
                reduce=_sum_over_ranks(trainer),
            )
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


def _sum_over_ranks(trainer: Trainer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Sums a tensor over the ranks through the strategy; None for one process (nothing to reduce)."""
    if trainer.world_size <= 1:
        return None
    strategy = trainer.strategy
    return lambda t: strategy.reduce(t, reduce_op="sum")
