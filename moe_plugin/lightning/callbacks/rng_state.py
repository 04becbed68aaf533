"""Random-number-generator state in the checkpoint, so a resumed run draws the same random numbers.

Lightning seeds once at start (`seed_everything`) but does not save the generators' states: a run resumed at
step N would otherwise continue with the seed's stream of step 0. This callback stores the torch (CPU and
CUDA-style), numpy and Python states when a checkpoint is written and puts them back at the first training
batch after a resume, i.e. at the same point of the step loop where they were taken (the end of the saved
step), after data loaders and strategy set-up have consumed whatever they consume.
Generators of other vendors' devices are not covered (torch has no device-agnostic RNG state API yet).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


class RNGState(pl.Callback):
    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _collect_rng_states(include_cuda=True)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None
