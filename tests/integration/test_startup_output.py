"""What a newcomer sees on the console: no "Epoch 0/-2", no "v_num", and no start-up noise from our code paths
(Lightning's seed line, its litlogger advertisement, torch's pytree FutureWarning raised inside Lightning, wandb's
warning about the `anonymous` argument)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOISE = ["Epoch 0/-2", "v_num", "Seed set to", "litlogger", "LeafSpec", "Warning:", "WARNING"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_run_console_is_clean(train, tmp_path: Path) -> None:
    # the default logger (W&B offline): wandb warned about the `anonymous` argument Lightning always passes
    proc = train("experiment=tiny_smoke", "logger=wandb", "trainer.enable_progress_bar=true", "sample_lines=0")
    out = proc.stdout + proc.stderr
    assert "Epoch 0" in out and "== moe_plugin run summary ==" in out
    found = [n for n in NOISE if n in out]
    assert not found, f"{found}\n--- stderr\n{proc.stderr[-4000:]}"
