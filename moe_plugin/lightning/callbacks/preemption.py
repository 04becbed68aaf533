"""Checkpoint on SIGTERM: a preempted or stopped job saves its state at the next step boundary, then exits.

SIGTERM is what schedulers send before killing a job (SLURM preemption and `scancel`, Kubernetes pod
eviction, torchrun stopping a worker group). Lightning's handler records it (`trainer.received_sigterm`)
and ends fit with SIGTERMException after the current batch. With several processes the signal handler is
replaced by one with no collective (moe_plugin/lightning/sigterm.py: Lightning's runs a broadcast inside the
handler, which desynchronises the ranks' collectives). This callback, at the end of each training step, asks
every rank whether any of them received it (one all-reduce of a flag, lightning/sigterm.agree_on_sigterm), and
if so all ranks save together

    <checkpoint folder>/preempted-step<global step>.ckpt

and wait until it is on disk (the async writer is flushed). Lightning then ends fit after this step (its
metrics logged) on every rank, also on those that received no signal. With several processes the ranks agree
the same way after each validation batch, so a SIGTERM during validation stops every rank at the same batch. A
SIGTERM that arrives during validation (Lightning stops inside the validation loop, after the step's checks) or
during the validation after the last step is saved the same way from on_exception / on_train_end. The exit
status becomes 143 (128 + SIGTERM, "terminated"; Lightning alone exits with 0, which wrappers read as
"finished"). `resume=auto` then picks it up as the newest checkpoint: no step after the last periodic
checkpoint is lost. SIGKILL cannot be caught: for that, periodic checkpoints and resume=auto are the answer.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

from moe_plugin.lightning.events import append_event, events_path
from moe_plugin.lightning.sigterm import LIGHTNING_HANDLER, agree_on_sigterm, install_local_sigterm_handler
from moe_plugin.parallel.consensus import consensus_group

log = logging.getLogger(__name__)


class PreemptionCheckpoint(pl.Callback):
    def __init__(self, check_every_n_steps: int = 1, events_file: str | None = None) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"callbacks.preemption.check_every_n_steps={check_every_n_steps} must be >= 1.")
        self.check_every_n_steps = check_every_n_steps
        self.events_file = events_file
        self.saved_path: Path | None = None
        self.agreeing = False  # the collective-free SIGTERM handler is in place (several processes)

    def _install(self, trainer: pl.Trainer) -> None:
        # after Lightning registered its handlers (Trainer._run, right before sanity check and fit loop)
        self.agreeing = trainer.world_size > 1 and install_local_sigterm_handler(trainer)
        if trainer.world_size > 1 and not self.agreeing:
            log.warning(
                "preemption: this Lightning (%s) has no signal connector %s to replace; a SIGTERM that reaches the "
                "ranks at different points may desynchronise their collectives (moe_plugin/lightning/sigterm.py).",
                pl.__version__,
                LIGHTNING_HANDLER,
            )

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.saved_path is not None or trainer.global_step % self.check_every_n_steps:
            return
        if not agree_on_sigterm(trainer, pl_module.device, consensus_group(trainer)):
            return
        self._save(trainer, "step boundary")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Lightning checks trainer.received_sigterm after each validation batch: set it on every rank at once
        if self.agreeing and self.saved_path is None:
            agree_on_sigterm(trainer, pl_module.device, consensus_group(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # SIGTERM during the validation that follows the last step: Lightning finishes fit normally (exit 0)
        if self.saved_path is None and agree_on_sigterm(trainer, pl_module.device, consensus_group(trainer)):
            self._save(trainer, "end of training")
            raise SIGTERMException()  # on_exception below turns it into exit status 143

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Lightning ends fit with SIGTERMException (a SystemExit with status 0) at its own check points: after a
        training step (where on_train_batch_end above already saved) but also inside a validation loop, after the
        step's on_train_batch_end ran. The second case is the race: with frequent validation most SIGTERMs land
        there. The state is then that of the last finished optimizer step (validation changes no weights, and the
        data position counts processed batches), so it is saved here."""
        if not isinstance(exception, SIGTERMException):
            return
        if self.saved_path is None:
            self._save(trainer, "during validation" if trainer.validating or trainer.sanity_checking else "on exit")
        # make the status say "terminated", so wrappers and schedulers do not take it for "finished"
        exception.code = 128 + signal.SIGTERM
        log.warning("preemption: rank %d exits with status %d", trainer.global_rank, exception.code)

    def _save(self, trainer: pl.Trainer, where: str) -> None:
        cb = trainer.checkpoint_callback
        folder = Path(getattr(cb, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints")
        path = folder / f"preempted-step{trainer.global_step:06d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # full state (optimizer too), said explicitly
        wait = getattr(trainer.strategy.checkpoint_io, "wait", None)
        if callable(wait):
            wait()  # the process is about to end: the file must be complete first
        self.saved_path = path
        log.warning("preemption: SIGTERM received; saved %s at step %d (%s)", path, trainer.global_step, where)
        if trainer.is_global_zero:
            append_event(
                events_path(trainer, self.events_file),
                "preemption",
                "saved",
                step=trainer.global_step,
                checkpoint=str(path),
                where=where,
            )
