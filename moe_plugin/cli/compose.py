"""Compose the package's Hydra config from command-line overrides, outside of @hydra.main."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_module
from omegaconf import DictConfig


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "train", return_hydra_config: bool = False
) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(
            f"moe-plugin: {bad[0]!r} is not an override. Use Hydra's key=value form, e.g. model=ling_lite "
            "model.num_layers=4."
        )
    with initialize_config_module(config_module="moe_plugin.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
