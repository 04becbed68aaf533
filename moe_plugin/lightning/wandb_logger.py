"""Lightning's WandbLogger without the start-up warning it causes with wandb >= 0.2x.

Lightning 2.6 always passes `anonymous=None` to `wandb.init`, and wandb 0.31 warns "The anonymous setting has no
effect and will be removed" for any value given, at every run start. The setting does nothing, so the argument is
left out when the user did not ask for it. Everything else is Lightning's logger (`conf/logger/wandb.yaml`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
