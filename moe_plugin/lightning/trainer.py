"""Build the Lightning Trainer from a composed config.

Accelerator and strategy come from their own config groups (`accelerator=...`, `strategy=...`) so that
vendor resolution and expert parallelism have one place to hook in.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def resolve_accelerator(cfg: DictConfig) -> Any:
    """The `accelerator` Trainer argument for `cfg.accelerator`."""
    return cfg.accelerator.get("name", "cpu") if cfg.get("accelerator") else "cpu"


def resolve_strategy(cfg: DictConfig) -> Any:
    """The `strategy` Trainer argument for `cfg.strategy`: a registered name or an instantiated object."""
    node = cfg.get("strategy")
    if node is None:
        return "auto"
    if "_target_" in node:
        return instantiate(node)
    return node.get("name", "auto")


def instantiate_list(node: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a mapping (Hydra group whose entries may be null)."""
    if not node:
        return []
    out = []
    for _, item in node.items():
        if item is not None and "_target_" in item:
            out.append(instantiate(item))
    return out


def resolve_plugins(cfg: DictConfig) -> list[Any]:
    """Trainer plugins from their config groups: `checkpoint_io` (how checkpoint files are written and read)."""
    node = cfg.get("checkpoint_io")
    return [instantiate(node)] if node is not None and "_target_" in node else []


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Any]) -> pl.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kwargs, dict)
    plugins = [*resolve_plugins(cfg), *(kwargs.pop("plugins", None) or [])]
    return pl.Trainer(
        accelerator=resolve_accelerator(cfg),
        strategy=resolve_strategy(cfg),
        callbacks=callbacks,
        logger=loggers if loggers else False,
        plugins=plugins or None,
        **kwargs,
    )
