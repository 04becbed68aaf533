"""LightningModule for MoE language models: LM loss + router auxiliary losses, AdamW, LR schedule.

Model math lives in moe_plugin.layers/models; this file only wires it into Lightning.
    loss = cross_entropy(logits, labels) + sum over MoE layers of (balance_coef * L_balance + z_coef * L_z)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from moe_plugin.layers.moe import collect_aux_losses, moe_layers
from moe_plugin.lightning.schedules import lr_multiplier
from moe_plugin.models.param_groups import decay_groups


class MoELanguageModule(pl.LightningModule):
    # tells MoEAuxLoss (lightning/mixin.py) that this module already adds the auxiliary losses itself
    adds_moe_aux_losses = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        schedule: str = "cosine",
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        halve_at: float = 0.6,
        anneal_at: float = 1.0,
        total_steps: int | None = None,
        optimizer: str = "adamw",
        momentum: float = 0.0,
    ) -> None:
        """optimizer: adamw (default) or sgd (with `momentum`; linear in the gradient, which the local-SGD
        reference test needs: averaging weights after one SGD step equals one step on averaged gradients)."""
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optim.optimizer={optimizer!r} must be 'adamw' or 'sgd'.")
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        lr_multiplier(schedule, warmup_steps, total_steps or 1, min_lr_ratio, halve_at, anneal_at)  # validate now

    def forward(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids_BS)

    def _step(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        input_ids_BS, labels_BS = batch[:, :-1], batch[:, 1:]
        logits_BSV = self.model(input_ids_BS)
        lm_loss = F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(), labels_BS.reshape(-1))
        return lm_loss, logits_BSV, collect_aux_losses(self.model)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        lm_loss, _, aux = self._step(batch)
        loss = lm_loss if aux is None else lm_loss + aux
        bs = batch.shape[0]
        # train/loss and train/lm_loss are logged from on_before_backward, as means over ranks (see there)
        self._losses_to_log = (torch.stack([loss.detach(), lm_loss.detach()]).float(), bs)
        # logged here rather than by LearningRateMonitor, which refuses to run without a logger
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        layers = moe_layers(self.model)
        if aux is not None and layers:
            self.log("train/aux_loss", aux.detach(), batch_size=bs)
            for key in ("balance_loss", "z_loss"):
                values = [m.stats.losses[key] for m in layers if key in m.stats.losses]
                if values:
                    self.log(f"train/{key}", torch.stack(values).mean(), batch_size=bs)
        return loss

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Log the global batch's losses (mean over ranks; each rank's share has the same number of tokens), so
        curves from different layouts compare: one 2-scalar all-reduce per micro-batch, through the strategy
        (local_sgd: the island). Equal to one process's loss on the same global batch
        (tests/distributed/test_warmup_exact.py). Done here, not in training_step: the straggler monitor takes
        forward (training_step) as free of collectives, and Lightning calls callbacks' on_before_backward
        before this hook, so the all-reduce is timed inside backward, with the gradient all-reduce."""
        pending = getattr(self, "_losses_to_log", None)
        if pending is None:
            return
        self._losses_to_log = None
        losses, bs = pending
        global_loss, global_lm_loss = self._mean_over_ranks(losses)
        self.log("train/loss", global_loss, prog_bar=True, batch_size=bs)
        self.log("train/lm_loss", global_lm_loss, batch_size=bs)

    def _mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return t
        return trainer.strategy.reduce(t, reduce_op="mean")

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        lm_loss, _, _ = self._step(batch)
        self.log("val/loss", lm_loss, prog_bar=True, sync_dist=True, batch_size=batch.shape[0])
        return lm_loss

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # the LM loss only (no auxiliary losses), averaged over tokens; evaluate.py derives perplexity and bpb
        lm_loss, _, _ = self._step(batch)
        self.log("test/loss", lm_loss, sync_dist=True, batch_size=batch.shape[0])
        return lm_loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The model's constructor arguments: export, generation and evaluation rebuild it from the file alone.
        config = getattr(self.model, "init_kwargs", None)
        if config is not None:
            checkpoint["model_config"] = config
        if getattr(self.model, "hf_source", None):  # imported from a Hugging Face folder (its tokenizer, on export)
            checkpoint["hf_source"] = self.model.hf_source

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = dict(self.model.named_parameters())
        decay, no_decay = ([params[n] for n in g] for g in decay_groups(self.model))
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if hp.get("optimizer", "adamw") == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.get("momentum", 0.0))
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        total = hp.total_steps or int(self.trainer.estimated_stepping_batches)
        fn = lr_multiplier(hp.schedule, hp.warmup_steps, max(1, total), hp.min_lr_ratio, hp.halve_at, hp.anneal_at)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
