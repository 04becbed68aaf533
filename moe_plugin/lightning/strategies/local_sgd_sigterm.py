"""Lightning's per-batch SIGTERM agreement, scoped to one island: the one place local_sgd touches a private
Lightning name.

Why: before every training batch, Lightning 2.6's `_TrainingEpochLoop.advance` calls
`self._broadcast_sigterm_tensor()`, which runs `torch.distributed.broadcast(flag, src=0)` on the WORLD group
(not through `Strategy.broadcast`, and swallowing errors) whenever `trainer.world_size > 1`. Across islands that
ties every step of every island to global rank 0: with time-based rounds the islands take different numbers of
steps, so island 1 would wait in that broadcast for a batch rank 0 only starts after the sync that island 1 has
not reached - a deadlock until the collective timeout. There is no public extension point for it (checked in
lightning 2.6.6: the call site, the signal connector and the strategy API; see ../shared/LIGHTNING-NOTES.md), so
`scope_sigterm_to_island` replaces that bound method on this trainer's epoch-loop instance (not the class) with
the same agreement inside the island: the island's rank 0 broadcasts its flag, every rank of the island raises
SIGTERMException together (the preemption callback then saves), the other islands learn of the stop at the next
sync (stop flag).

If a Lightning upgrade renames the method: with time-based rounds the strategy refuses to start (the deadlock
above), with step-based rounds it warns (every island runs the same steps, so the world broadcast only costs a
tiny collective per step). tests/unit/lightning/test_local_sgd_sigterm.py fails in CI on such an upgrade.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from moe_plugin.parallel.islands import IslandMesh, island_flag

HOOK = "_broadcast_sigterm_tensor"  # lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop


class SigtermHookMissing(RuntimeError):
    """The installed Lightning no longer has the per-batch SIGTERM broadcast this module scopes to an island."""


def scope_sigterm_to_island(trainer: pl.Trainer, mesh: IslandMesh, device: Any, required: bool) -> bool:
    """Make `trainer`'s per-batch SIGTERM agreement island-scoped. Returns whether the hook was installed.

    required: raise SigtermHookMissing when it cannot be (time-based rounds); otherwise warn.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if not callable(getattr(epoch_loop, HOOK, None)):
        message = (
            f"local_sgd: this Lightning ({pl.__version__}) has no {type(epoch_loop).__name__}.{HOOK}; its per-batch "
            "SIGTERM broadcast over every rank cannot be scoped to an island (moe_plugin/lightning/strategies/"
            "local_sgd_sigterm.py)."
        )
        if required:
            raise SigtermHookMissing(
                message + " With time-based rounds (strategy.sync_every_seconds) islands would deadlock in it: use "
                "strategy.sync_every_steps, or the Lightning version pinned in pyproject.toml."
            )
        rank_zero_warn(message + " Islands then agree on it every step (correct, slightly slower).")
        return False

    def island_sigterm() -> None:
        received = int(bool(getattr(trainer, "received_sigterm", False)))
        if island_flag(received, mesh, device) == 1:
            raise SIGTERMException()

    setattr(epoch_loop, HOOK, island_sigterm)
    return True
