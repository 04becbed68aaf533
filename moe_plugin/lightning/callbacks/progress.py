"""The training progress bar, without Lightning's two confusing bits.

- Lightning's rich bar writes "Epoch {e}/{max_epochs - 1}", which reads "Epoch 0/-2" for a run bounded by
  `trainer.max_steps` (`max_epochs=-1`, our default): with no epoch limit we write "Epoch {e}" as the tqdm bar does.
- "v_num" (the logger's version number, e.g. a CSV logger's version_0) means nothing next to the loss: dropped.

`build_trainer` installs this bar when `trainer.enable_progress_bar` is true and no other progress bar is given.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


def _without_version(items: dict[str, Any]) -> dict[str, Any]:
    items.pop("v_num", None)
    return items


class MoERichProgressBar(RichProgressBar):
    """Lightning's rich progress bar; the epoch is shown as "Epoch e" when there is no epoch limit."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return _without_version(super().get_metrics(trainer, pl_module))

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        # the parent pads to the validation description's width, so the two bars do not flicker
        return f"{description:{len(self.validation_description)}}"


class MoETQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar without "v_num"."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return _without_version(super().get_metrics(trainer, pl_module))


def default_progress_bar() -> ProgressBar:
    """The bar Lightning would pick (rich when installed, else tqdm), cleaned up."""
    return MoERichProgressBar() if _RICH_AVAILABLE else MoETQDMProgressBar()
