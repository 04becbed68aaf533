"""Build the Lightning Trainer from a composed config.

Accelerator and strategy come from their own config groups (`accelerator=...`, `strategy=...`) so that
vendor resolution and expert parallelism have one place to hook in.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe_plugin.config.validate import ConfigError


def resolve_accelerator(
    cfg: DictConfig, trainer_kwargs: dict[str, Any] | None = None, strategy: Any = None
) -> dict[str, Any]:
    """Trainer arguments for `cfg.accelerator` (vendor, devices, strategy, precision plugin).

    Vendor-aware (moe_plugin.accelerators.resolve): `auto` picks the detected vendor, a missing vendor
    fails fast listing what was detected, and npu/xpu/mlu/musa get their own single-device/DDP
    strategy and an AMP plugin on their device type instead of Lightning's CUDA defaults.
    """
    from moe_plugin.accelerators import AcceleratorNotFoundError
    from moe_plugin.accelerators import resolve_accelerator as resolve_vendor

    name = cfg.accelerator.get("name", "auto") if cfg.get("accelerator") else "auto"
    if trainer_kwargs is None:
        trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.get("trainer") else {}
    if strategy is None:
        strategy = resolve_strategy(cfg)
    try:
        resolved = resolve_vendor(
            name,
            devices=trainer_kwargs.get("devices", "auto"),
            strategy=strategy,
            precision=trainer_kwargs.get("precision"),
            num_nodes=int(trainer_kwargs.get("num_nodes", 1)),
        )
    except (AcceleratorNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    return resolved.trainer_kwargs


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


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Any]) -> pl.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs.update(resolve_accelerator(cfg, kwargs, resolve_strategy(cfg)))
    return pl.Trainer(
        callbacks=callbacks,
        logger=loggers if loggers else False,
        **kwargs,
    )
