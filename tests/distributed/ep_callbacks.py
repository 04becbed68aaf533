"""Callbacks the Lightning-level tests add to `python train.py` through Hydra (+callbacks.NAME._target_=...)."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from moe_plugin.layers.moe import moe_layers


class GlobalLossRecorder(pl.Callback):
    """Appends {"step", "loss", "balance", "z"} per step to `path`: values of the GLOBAL batch (mean over ranks)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        layers = moe_layers(pl_module)
        vals = torch.stack(
            [
                outputs["loss"].detach().float(),
                torch.stack([m.stats.losses["balance_loss"] for m in layers]).mean().float(),
                torch.stack([m.stats.losses["z_loss"] for m in layers]).mean().float(),
            ]
        )
        if dist.is_initialized():
            dist.all_reduce(vals)
            vals /= dist.get_world_size()
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": trainer.global_step,
                            "loss": vals[0].item(),
                            "balance": vals[1].item(),
                            "z": vals[2].item(),
                        }
                    )
                    + "\n"
                )


class KillRank(pl.Callback):
    """Simulates a crashed rank: process `rank` exits abruptly when optimizer step `at_step` begins."""

    def __init__(self, rank: int, at_step: int) -> None:
        self.rank, self.at_step = rank, at_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.at_step:
            os._exit(9)


class WarmupRecorder(pl.Callback):
    """Appends, on rank 0, {"step", "logged_loss", "mean", "std", "warmup_step"} per step to `path`: the
    `train/loss` the module logged (what loggers receive) and layer 0's routing-warmup state after the step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        w = moe_layers(pl_module)[0].router.warmup
        row = {
            "step": trainer.global_step,
            "logged_loss": float(trainer.callback_metrics["train/loss"]),
            "mean": float(w.logit_mean),
            "std": float(w.logit_std),
            "warmup_step": int(w.step),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
