"""Build the Lightning Trainer from a composed config.

Accelerator and strategy come from their own config groups (`accelerator=...`, `strategy=...`) so that
vendor resolution and expert parallelism have one place to hook in.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from omegaconf import DictConfig, OmegaConf

from moe_plugin.errors import ConfigError, UserError
from moe_plugin.lightning.callbacks.progress import default_progress_bar

# Lightning 2.6's CombinedLoader builds torch pytree LeafSpecs, which torch 2.13 deprecates with a FutureWarning on
# every fit/validate/test (Lightning's code, nothing a user can act on). Only that message, from that module.
warnings.filterwarnings(
    "ignore",
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    category=FutureWarning,
    module=r"lightning\.pytorch\.utilities\._pytree",
)


class _NoAdvert(logging.Filter):
    """Drops Lightning's "Tip: ... try installing litlogger" advertisement, printed at every Trainer construction."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvert())


def build(node: Any, key: str, **kwargs: Any) -> Any:
    """`instantiate(node)`, with a constructor's refusal of a bad value reported as a ConfigError naming `key`.

    Hydra wraps whatever a constructor raises in InstantiationException (a multi-line message with the class
    path). Constructors here raise ValueError/FileNotFoundError with messages naming the key and the fix, or a
    UserError: those are bad input, not bugs, and surface as one line. Anything else keeps its traceback.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause: BaseException | None = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise ConfigError(f"{key}: {cause}") from None
        raise


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
    for name, item in node.items():
        if item is not None and "_target_" in item:
            out.append(build(item, str(name)))
    return out


def resolve_plugins(cfg: DictConfig) -> list[Any]:
    """Trainer plugins from their config groups: `checkpoint_io` (how checkpoint files are written and read)."""
    node = cfg.get("checkpoint_io")
    return [build(node, "checkpoint_io")] if node is not None and "_target_" in node else []


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Any]) -> pl.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs.update(resolve_accelerator(cfg, kwargs, resolve_strategy(cfg)))
    extra = kwargs.pop("plugins", None) or []
    plugins = [*resolve_plugins(cfg), *(extra if isinstance(extra, (list, tuple)) else [extra])]
    if kwargs.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks = [*callbacks, default_progress_bar()]  # no "Epoch 0/-2" and no "v_num" (callbacks/progress.py)
    return pl.Trainer(
        callbacks=callbacks,
        logger=loggers if loggers else False,
        plugins=plugins or None,
        **kwargs,
    )
