"""Compose the package's Hydra config from command-line overrides, outside of @hydra.main.

Composition errors (an unknown option such as `model=nope`, an override of a key that does not exist, bad
override syntax) become one-line ConfigErrors naming the override and, for an unknown option, the valid ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hydra import compose, initialize_config_module
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig

from moe_plugin.errors import ConfigError


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "train", return_hydra_config: bool = False
) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(
            f"{bad[0]!r} is not an override. Use Hydra's key=value form, e.g. model=ling_lite model.num_layers=4."
        )
    try:
        with initialize_config_module(config_module="moe_plugin.conf", version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    except MissingConfigException as err:
        raise ConfigError(_missing_option(str(err), overrides)) from None
    except HydraException as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ConfigError(" ".join(lines[:2])) from None


def _missing_option(text: str, overrides: Sequence[str]) -> str:
    """'In 'train': Could not find 'model/nope' ... Available options in 'model': ...' -> one line."""
    found = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if not found:
        return text.splitlines()[0]
    group, option = found.groups()
    options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
    return f"{group}={option}: no such {group} option. Choose one of: {', '.join(options)}."
