"""`python train.py accelerator=<absent vendor>` fails fast with the detected hardware in the message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks the message on a machine without accelerators")
def test_train_with_absent_npu_fails_fast(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "train.py", "accelerator=npu", f"hydra.run.dir={tmp_path}", "logger=none"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "accelerator=npu (Huawei Ascend" in out.stderr
    assert "torch_npu: not installed" in out.stderr and "Detected: cpu" in out.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing was built or trained
