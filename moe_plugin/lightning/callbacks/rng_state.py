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
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


def _to_safe(states: dict[str, Any]) -> dict[str, Any]:
    """numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: store it as a tensor."""
    out = dict(states)
    if "numpy" in out:
        name, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (
            str(name),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        )
    return out


def _from_safe(states: dict[str, Any]) -> dict[str, Any]:
    out = dict(states)
    if "numpy" in out:
        name, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    return out


class RNGState(pl.Callback):
    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _to_safe(_collect_rng_states(include_cuda=True))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            _set_rng_states(_from_safe(self._pending))
            self._pending = None
