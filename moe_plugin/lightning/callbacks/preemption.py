"""Checkpoint on SIGTERM: a preempted or stopped job saves its state at the next step boundary, then exits.

SIGTERM is what schedulers send before killing a job (SLURM preemption and `scancel`, Kubernetes pod
eviction, torchrun stopping a worker group). Lightning's handler only records it (`trainer.received_sigterm`)
and ends fit with SIGTERMException after the current batch. This callback, at the end of each training
step, asks every rank whether any of them received it (one all-reduce of a flag,
moe_plugin.parallel.consensus.all_ranks_agree), and if so all ranks save together

    <checkpoint folder>/preempted-step<global step>.ckpt

and wait until it is on disk (the async writer is flushed). Lightning then ends fit after this step (its
metrics logged) on every rank that received SIGTERM, as schedulers and torchrun send it to all; the exit status
becomes 143 (128 + SIGTERM, "terminated"; Lightning alone exits with 0, which wrappers read as "finished"). `resume=auto` then picks it
up as the newest checkpoint: no step after the last periodic checkpoint is lost. SIGKILL cannot be caught:
for that, periodic checkpoints and resume=auto are the answer.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

from moe_plugin.lightning.events import append_event, events_path
from moe_plugin.parallel.consensus import all_ranks_agree, consensus_group

log = logging.getLogger(__name__)


class PreemptionCheckpoint(pl.Callback):
    def __init__(self, check_every_n_steps: int = 1, events_file: str | None = None) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"callbacks.preemption.check_every_n_steps={check_every_n_steps} must be >= 1.")
        self.check_every_n_steps = check_every_n_steps
        self.events_file = events_file
        self.saved_path: Path | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.saved_path is not None or trainer.global_step % self.check_every_n_steps:
            return
        if not all_ranks_agree(bool(trainer.received_sigterm), pl_module.device, consensus_group(trainer)):
            return
        cb = trainer.checkpoint_callback
        folder = Path(getattr(cb, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints")
        path = folder / f"preempted-step{trainer.global_step:06d}.ckpt"
        trainer.save_checkpoint(path)
        wait = getattr(trainer.strategy.checkpoint_io, "wait", None)
        if callable(wait):
            wait()  # the process is about to end: the file must be complete first
        self.saved_path = path
        log.warning("preemption: SIGTERM received; saved %s at step %d", path, trainer.global_step)
        if trainer.is_global_zero:
            append_event(
                events_path(trainer, self.events_file),
                "preemption",
                "saved",
                step=trainer.global_step,
                checkpoint=str(path),
            )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning ends fit with SIGTERMException (a SystemExit with status 0) right after the step whose metrics
        # it logged; make the status say "terminated" so wrappers and schedulers do not take it for "finished".
        if isinstance(exception, SIGTERMException) and self.saved_path is not None:
            exception.code = 128 + signal.SIGTERM
