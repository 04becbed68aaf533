"""Run summary: tokens seen, wall time and tokens/s, written by run() as summary.json."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch


class RunSummary(pl.Callback):
    """Counts trained tokens (across data-parallel ranks) and the time spent in training steps, and remembers the
    step of the last validation run during fit (run() skips its final validation when fit just validated there)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.train_seconds = 0.0
        self._t0: float | None = None
        self.fit_validated_at_step: int | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._t0 is not None:
            self.train_seconds += time.perf_counter() - self._t0
        if isinstance(batch, torch.Tensor):
            # each sample is seq_len + 1 tokens: seq_len predictions
            self.tokens += batch.shape[0] * (batch.shape[1] - 1) * trainer.world_size

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.fit_validated_at_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0
