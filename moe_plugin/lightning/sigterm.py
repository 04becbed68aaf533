"""SIGTERM in a multi-process run: recorded by the signal handler with no collective, agreed over the ranks at
fixed points (the preemption callback's step and validation-batch boundaries).

Why: Lightning 2.6's SIGTERM handler (`_SignalConnector._sigterm_notifier_fn`) runs
`torch.distributed.broadcast(flag, src=0)` INSIDE the signal handler, i.e. wherever Python happens to be when the
signal lands, once per signal received. The ranks of a job do not receive the same signals at the same point: a
scheduler signals them at slightly different times, Lightning's launcher forwards a SIGTERM from rank 0 to the
ranks it started (`launcher.kill`, so those get one more), and a signal to a single rank (the fault injector, a
node's own OOM killer sending SIGTERM) reaches no other. One rank then waits in that broadcast while its peers
are in the next step's all-to-all or all-reduce: reproduced with 2 processes, under `expert_parallel` (gloo
"Timed out waiting 60000ms for recv" in the handler's broadcast on rank 1, rank 0 in the MoE all-to-all) and
under `deepspeed_ep` (gloo "Connection closed by peer"), no checkpoint written. Lightning's later per-rank checks
(`if trainer.received_sigterm: raise SIGTERMException` at the end of each training batch, each validation batch
and each epoch) read the same flag, which a signal can flip on one rank between two ranks' checks.

The fix, installed by `install_local_sigterm_handler` (called by the preemption callback once Lightning has
registered its handlers, only when the run has more than one process):

    signal handler     records the signal on this rank (`sigterm_received_here`) and, like Lightning, forwards
                       the first one to the processes its launcher started; no collective
    agreement points   `agree_on_sigterm` (one all-reduce MAX of the flag over the consensus group): if any rank
                       received SIGTERM, every rank sets `trainer.received_sigterm` at that same point

so Lightning's own checks, which all read `trainer.received_sigterm`, fire on every rank at the same check.
With one process nothing is replaced (Lightning's handler does no collective then).

There is no public extension point for the handler (lightning 2.6.6: the connector registers a composition of
handlers in `Trainer._run` right before the fit loop starts). tests/unit/lightning/test_sigterm.py fails on a
Lightning upgrade that changes it; the preemption callback then warns and keeps Lightning's handler.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import lightning.pytorch as pl
import torch

from moe_plugin.parallel.consensus import all_ranks_agree

log = logging.getLogger(__name__)

LIGHTNING_HANDLER = "_sigterm_notifier_fn"  # lightning.pytorch.trainer.connectors.signal_connector._SignalConnector
_RECEIVED_HERE = "_moe_plugin_sigterm_received_here"  # attribute on the trainer's signal connector


def sigterm_received_here(trainer: pl.Trainer) -> bool:
    """Whether THIS rank received SIGTERM (or the ranks already agreed on one). Local, no collective."""
    connector = trainer._signal_connector
    return bool(getattr(connector, _RECEIVED_HERE, False) or connector.received_sigterm)


def agree_on_sigterm(trainer: pl.Trainer, device: torch.device | str, group: Any = None) -> bool:
    """True on every rank of `group` iff any of them received SIGTERM; then `trainer.received_sigterm` is set on
    all of them (Lightning stops at its next check, on every rank alike). Collective over `group`."""
    if not all_ranks_agree(sigterm_received_here(trainer), device, group):
        return False
    trainer._signal_connector.received_sigterm = True
    return True


def _lightning_handler(trainer: pl.Trainer) -> Any:
    return getattr(trainer._signal_connector, LIGHTNING_HANDLER, None)


def install_local_sigterm_handler(trainer: pl.Trainer) -> bool:
    """Replace Lightning's SIGTERM notifier in the registered SIGTERM handler by one with no collective.

    Returns whether the handler in place is now the collective-free one (True also when it already was).
    Call after Lightning registered its handlers (on_sanity_check_start / on_train_start of a fit).
    """
    current = signal.getsignal(signal.SIGTERM)
    if getattr(current, "_moe_plugin_local", False):
        return True
    handlers = getattr(current, "signal_handlers", None)  # Lightning's _HandlersCompose
    lightning_notifier = _lightning_handler(trainer)
    if lightning_notifier is None or not isinstance(handlers, list) or lightning_notifier not in handlers:
        return False
    connector = trainer._signal_connector
    setattr(connector, _RECEIVED_HERE, False)
    others = [h for h in handlers if h != lightning_notifier]

    def record_sigterm(signum: int, frame: Any) -> None:
        log.info(
            "rank %d: received SIGTERM (%d); the ranks agree at the next step boundary", trainer.global_rank, signum
        )
        if not sigterm_received_here(trainer):
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)  # as Lightning: the ranks this process started stop too
        setattr(connector, _RECEIVED_HERE, True)
        for h in others:  # the handlers Lightning composed with its own (e.g. one the user had installed)
            if callable(h):
                h(signum, frame)

    record_sigterm._moe_plugin_local = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, record_sigterm)
    return True


__all__ = ["LIGHTNING_HANDLER", "agree_on_sigterm", "install_local_sigterm_handler", "sigterm_received_here"]
