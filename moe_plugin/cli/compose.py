"""Compose the package's Hydra config from command-line overrides, outside of @hydra.main.

Composition errors (an unknown option such as `model=nope`, an override of a key that does not exist, bad
override syntax) become one-line ConfigErrors naming the override and, for an unknown option, the valid ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hydra import compose, initialize_config_module
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig

from moe_plugin.errors import ConfigError


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "train", return_hydra_config: bool = False
) -> DictConfig:
    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]  # `~key` deletes a key
    if bad:
        raise ConfigError(
            f"{bad[0]!r} is not an override. Use Hydra's key=value form, e.g. model=ling_lite model.num_layers=4."
        )
    try:
        with initialize_config_module(config_module="moe_plugin.conf", version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    except MissingConfigException as err:
        raise ConfigError(_missing_option(str(err), overrides)) from None
    except OverrideParseException as err:
        raise ConfigError(_parse_error(str(err), overrides)) from None
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


def _parse_error(text: str, overrides: Sequence[str]) -> str:
    """Hydra's grammar error (several lines, the override not always named) -> one line naming the override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    culprit = next((o for o in overrides if not _parses(parser, o)), None)
    reason = text.splitlines()[0].strip()
    where = f"{culprit!r} is not a valid override" if culprit else "An override is not valid"
    return (
        f"{where} ({reason}). Quote values holding special characters, e.g. 'data.source.paths=[\"~/books\"]' "
        "(see https://hydra.cc/docs/advanced/override_grammar/basic)."
    )


def _parses(parser: object, override: str) -> bool:
    try:
        parser.parse_overrides([override])  # type: ignore[attr-defined]
        return True
    except HydraException:
        return False


# @hydra.main flags after which composing the package's own config would not match what Hydra composes (another
# config folder or name) or is not needed (help, completion).
_SKIP_FLAGS = ("help", "hydra_help", "shell_completion", "info", "config_path", "config_name", "config_dir")


def check_command_line(argv: Sequence[str]) -> None:
    """Compose `train.py`'s config from its command line before @hydra.main does, so that an override error
    (`model=nope`, `trainer.max_stepz=3`, `a=b=c`) is one ConfigError line, exit 2, and no run folder; Hydra
    itself prints several lines and exits 1.

    Under `--multirun` sweep overrides (`optim.lr=1e-3,2e-3`) are
    checked for syntax only, the rest is composed. Cost: one composition (a fraction of a second).
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args(list(argv))
    if any(getattr(args, flag, None) for flag in _SKIP_FLAGS) or args.experimental_rerun:
        return
    overrides = list(args.overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(_parse_error(str(err), overrides)) from None
    if args.multirun:
        overrides = [o.input_line for o in parsed if not o.is_sweep_override() and o.input_line is not None]
    compose_config(overrides, return_hydra_config=True)
