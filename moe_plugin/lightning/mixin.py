"""MoE glue for a user's own LightningModule: aux losses added to their loss, metrics logged, no
change to their `training_step`.

    class LitModel(MoEMixin, L.LightningModule):   # the only change to the class: one base, listed first
        ...                                        # training_step returns the task loss, as before

What the mixin does around the user's `training_step` (Lightning calls the wrapped method whatever the
strategy, DDP and expert_parallel included, because strategies look `training_step` up on the module):

    before:  forget the aux losses of earlier forwards (validation, a probe), so none is added twice
    step:    the user's code, untouched; it returns `loss` or {"loss": loss, ...} as usual
    after:   loss <- loss + sum over MoE layers of (aux_loss_coef * L_balance + z_loss_coef * L_z)
             (`collect_aux_losses`), and log train/aux_loss, train/balance_loss, train/z_loss

Gradient accumulation needs nothing more: Lightning divides the returned loss, aux terms included.
With manual optimisation (`automatic_optimization = False`) the user calls `self.manual_backward(loss)`
inside the step, so the mixin adds the aux losses there instead, once per forward.

Expert-load metrics (tokens per expert, imbalance, dead experts, dropped fraction) come from the
package's `ExpertLoad` callback, and step-level router updates (routing warmup, expert bias) from
`RouterUpdates`; `configure_callbacks` adds each unless the Trainer already has one.

`MoEAuxLoss` is the same behaviour as a callback, for a module class the user cannot or will not touch:
`Trainer(callbacks=[MoEAuxLoss()])` (or `callbacks=moe_aux_loss` in Hydra).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from moe_plugin.layers.moe import collect_aux_losses, moe_layers
from moe_plugin.lightning.callbacks import ExpertLoad, RouterUpdates

LOSS_KEYS = ("balance_loss", "z_loss")


def add_aux_losses(module: pl.LightningModule, output: Any, log: bool = True, prefix: str = "train/") -> Any:
    """`output` of a training_step with the MoE aux losses added to its loss; logs them on `module`.

    `output` may be a loss tensor, a mapping with a "loss" key (a new dict is returned), or None (a
    skipped step, returned as is).
    """
    aux = collect_aux_losses(module)
    if aux is None or output is None:
        return output
    if isinstance(output, torch.Tensor):
        new_output: Any = output + aux.to(output.dtype)
    elif isinstance(output, Mapping) and "loss" in output:
        new_output = {**output, "loss": output["loss"] + aux.to(output["loss"].dtype)}
    else:
        raise TypeError(
            f"MoE aux losses: training_step of {type(module).__name__} returned {type(output).__name__}; expected a "
            "loss tensor, a dict with a 'loss' key, or None. Return one of those, or add "
            "moe_plugin.collect_aux_losses(self) to your loss yourself and drop the mixin/callback."
        )
    if log:
        log_moe_losses(module, aux, prefix)
    return new_output


def log_moe_losses(module: pl.LightningModule, aux: torch.Tensor, prefix: str = "train/") -> None:
    """train/aux_loss (the weighted sum added to the loss) and the per-layer means of its raw terms."""
    if getattr(module, "_trainer", None) is None:
        return  # called outside a Trainer (a unit test calling training_step): nothing to log to
    module.log(f"{prefix}aux_loss", aux.detach())
    layers = moe_layers(module)
    for key in LOSS_KEYS:
        values = [m.stats.losses[key] for m in layers if key in m.stats.losses]
        if values:
            module.log(f"{prefix}{key}", torch.stack(values).float().mean())


def clear_aux_losses(model: nn.Module) -> None:
    for m in moe_layers(model):
        m.aux_loss = None


def wrap_training_step(step: Callable[..., Any], prefix_attr: str = "moe_log_prefix") -> Callable[..., Any]:
    """`step` (an unbound training_step) made to add the aux losses; re-entrant calls add them once."""
    if getattr(step, "_moe_wrapped", False):
        return step

    @functools.wraps(step)
    def training_step(self: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(self, "_moe_step_depth", 0)
        if depth == 0:
            clear_aux_losses(self)
        self._moe_step_depth = depth + 1
        try:
            output = step(self, *args, **kwargs)
        finally:
            self._moe_step_depth = depth
        # The outermost call adds (a subclass's training_step calling super() must not add twice); with
        # manual optimisation the loss has already been backpropagated, see manual_backward.
        if depth > 0 or not self.automatic_optimization:
            return output
        return add_aux_losses(
            self, output, log=getattr(self, "moe_log_losses", True), prefix=getattr(self, prefix_attr, "train/")
        )

    training_step._moe_wrapped = True  # type: ignore[attr-defined]
    return training_step


class MoEMixin:
    """Adds MoE aux losses to a LightningModule's training loss and turns on expert-load metrics.

    List it before `LightningModule` in the bases. Class attributes to change the behaviour:
    `moe_log_losses` (log train/aux_loss, balance_loss, z_loss; default True), `moe_log_prefix`
    ("train/"), `moe_expert_load_callback` (add the ExpertLoad and RouterUpdates callbacks; default True).
    """

    moe_log_losses: bool = True
    moe_log_prefix: str = "train/"
    moe_expert_load_callback: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The class's own training_step or the one it inherits from the user's base class; Lightning's
        # placeholder stays as is so that Lightning still sees "not overridden".
        step = getattr(cls, "training_step", None)
        if step is not None and step is not pl.LightningModule.training_step:
            cls.training_step = wrap_training_step(step)  # type: ignore[attr-defined]

    def moe_aux_loss(self) -> torch.Tensor | None:
        """The aux losses of the last forward, summed over MoE layers (None without MoE layers)."""
        return collect_aux_losses(self)  # type: ignore[arg-type]

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Manual optimisation: backpropagate the aux losses of this forward with the first loss."""
        aux = collect_aux_losses(self)  # type: ignore[arg-type]
        if aux is not None:
            loss = loss + aux.to(loss.dtype)
            if self.moe_log_losses:
                log_moe_losses(self, aux, self.moe_log_prefix)  # type: ignore[arg-type]
        super().manual_backward(loss, *args, **kwargs)  # type: ignore[misc]
        if aux is not None:
            clear_aux_losses(self)  # type: ignore[arg-type]  # consumed: a second backward must not re-add

    def configure_callbacks(self) -> Any:
        callbacks = super().configure_callbacks()  # type: ignore[misc]
        if not self.moe_expert_load_callback:
            return callbacks
        extra = missing_moe_callbacks(self.trainer)  # type: ignore[attr-defined]
        if not extra:
            return callbacks
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks] if callbacks else []
        return [*callbacks, *extra]


class MoEAuxLoss(pl.Callback):
    """The mixin's loss handling as a callback: wraps the module instance's training_step during fit."""

    def __init__(self, log: bool = True, prefix: str = "train/") -> None:
        self.log = log
        self.prefix = prefix

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A module that already adds the aux losses itself (the mixin, or one that sets
        # `adds_moe_aux_losses = True` like moe_plugin's own MoELanguageModule should) is left alone.
        if stage != "fit" or isinstance(pl_module, MoEMixin) or getattr(pl_module, "adds_moe_aux_losses", False):
            return
        if "training_step" in vars(pl_module):
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"MoEAuxLoss: {type(pl_module).__name__} uses manual optimisation, where the loss is backpropagated "
                "inside training_step, before a callback could add to it. Use `class ...(MoEMixin, "
                "LightningModule)` (it hooks manual_backward), or add moe_plugin.collect_aux_losses(self) to your loss."
            )
        pl_module.moe_log_losses = self.log  # type: ignore[attr-defined]
        pl_module.moe_log_prefix = self.prefix  # type: ignore[attr-defined]
        wrapped = wrap_training_step(type(pl_module).training_step)
        pl_module.training_step = functools.partial(wrapped, pl_module)  # type: ignore[method-assign]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(vars(pl_module).get("training_step"), functools.partial):
            del pl_module.training_step


def missing_moe_callbacks(trainer: pl.Trainer | None) -> list[pl.Callback]:
    """The package's MoE callbacks that the Trainer does not have yet: ExpertLoad (load metrics) and
    RouterUpdates (routing-warmup step, expert-bias updates, global-batch balance-loss window)."""
    have = list(trainer.callbacks) if trainer is not None else []
    return [cls() for cls in (ExpertLoad, RouterUpdates) if not any(isinstance(c, cls) for c in have)]
