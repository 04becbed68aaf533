"""Shared test set-up.

The repository root goes first on sys.path so that the checkout under test is imported, not another
editable install of the package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# The compiled CPU kernels (moe_plugin/kernels/native.py) are built into a cache of this test session, once,
# and every subprocess a test starts inherits the folder: the suite exercises the build and writes nothing
# outside temporary folders.
if "MOE_PLUGIN_KERNEL_CACHE" not in os.environ:
    import tempfile

    os.environ["MOE_PLUGIN_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="moe_plugin_kernels_")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _write_only_under_tmp(tmp_path_factory, monkeypatch):
    """Every test runs in a fresh temporary working directory: a test (or the library under test) that writes
    to a relative path writes there, never into the checkout (an `expert_load/` folder was once committed)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(autouse=True)
def _finish_open_wandb_run():
    """A W&B run left open by one test would be reused by the next WandbLogger (writing elsewhere)."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
