"""The collective-free SIGTERM handler (lightning/sigterm.py) on a real Trainer's signal connector, one process.

The multi-process behaviour (a SIGTERM on one rank stops every rank at the same step, with a checkpoint) is
tested end to end in tests/distributed/test_deepspeed_ep.py; these tests pin the private Lightning names it
relies on, so a Lightning upgrade that changes them fails here first.
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import pytest

from moe_plugin.lightning.sigterm import (
    LIGHTNING_HANDLER,
    agree_on_sigterm,
    install_local_sigterm_handler,
    sigterm_received_here,
)


@pytest.fixture
def trainer():
    t = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    before = signal.getsignal(signal.SIGTERM)
    t._signal_connector.register_signal_handlers()  # what Trainer._run does before the fit loop
    yield t
    t._signal_connector.teardown()
    assert signal.getsignal(signal.SIGTERM) == before  # Lightning's teardown restores the original handler


def test_lightning_still_registers_the_notifier_this_module_replaces(trainer: pl.Trainer) -> None:
    notifier = getattr(trainer._signal_connector, LIGHTNING_HANDLER)
    assert notifier in signal.getsignal(signal.SIGTERM).signal_handlers


def test_the_signal_is_recorded_here_and_set_for_lightning_only_when_agreed(trainer: pl.Trainer) -> None:
    calls = []
    assert install_local_sigterm_handler(trainer)
    assert install_local_sigterm_handler(trainer)  # idempotent: the second call sees its own handler
    handler = signal.getsignal(signal.SIGTERM)
    assert getattr(handler, "_moe_plugin_local", False)
    assert not sigterm_received_here(trainer) and not trainer.received_sigterm
    trainer.strategy._launcher = type("L", (), {"kill": lambda self, s: calls.append(s)})()
    os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the installed handler
    assert sigterm_received_here(trainer)
    assert not trainer.received_sigterm  # Lightning's per-rank checks do not fire before the ranks agree
    assert calls == [signal.SIGTERM]  # forwarded once to the processes this one started, as Lightning does
    handler(signal.SIGTERM, None)
    assert calls == [signal.SIGTERM]  # not forwarded again
    assert agree_on_sigterm(trainer, "cpu")  # one process: its own flag
    assert trainer.received_sigterm


def test_no_signal_no_agreement(trainer: pl.Trainer) -> None:
    assert install_local_sigterm_handler(trainer)
    assert not agree_on_sigterm(trainer, "cpu")
    assert not trainer.received_sigterm


def test_an_unknown_handler_is_left_alone(trainer: pl.Trainer) -> None:
    def other(signum, frame):  # not Lightning's composition (e.g. a future Lightning): nothing to replace
        pass

    signal.signal(signal.SIGTERM, other)
    assert not install_local_sigterm_handler(trainer)
    assert signal.getsignal(signal.SIGTERM) is other


def test_a_handler_installed_before_fit_still_runs() -> None:
    calls = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))  # the user's own handler
    try:
        t = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
        t._signal_connector.register_signal_handlers()  # Lightning composes it with its notifier
        try:
            assert install_local_sigterm_handler(t)
            os.kill(os.getpid(), signal.SIGTERM)
            assert calls == [signal.SIGTERM] and sigterm_received_here(t)
        finally:
            t._signal_connector.teardown()
    finally:
        signal.signal(signal.SIGTERM, before)
