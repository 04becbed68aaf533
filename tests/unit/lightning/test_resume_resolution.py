"""resume=auto|never|<path> and ckpt_path resolution, and the run-folder resolver for torchrun."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from moe_plugin.config.resolvers import run_id
from moe_plugin.config.validate import ConfigError
from moe_plugin.lightning.checkpoint_io import write_checkpoint_file
from moe_plugin.lightning.resume import resolve_resume


def _cfg(tmp_path, **top):
    return OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "callbacks": {"model_checkpoint": None}, **top})


def test_auto_picks_newest_valid_and_starts_fresh_when_none(tmp_path):
    assert resolve_resume(_cfg(tmp_path, resume="auto")) is None
    for step in (2, 4):
        write_checkpoint_file({"global_step": step}, tmp_path / "checkpoints" / f"step{step}.ckpt")
    assert resolve_resume(_cfg(tmp_path, resume="auto")).endswith("step4.ckpt")
    (tmp_path / "checkpoints" / "step4.ckpt").write_bytes(b"torn")
    assert resolve_resume(_cfg(tmp_path, resume="auto")).endswith("step2.ckpt")
    assert resolve_resume(_cfg(tmp_path, resume="never")) is None
    assert resolve_resume(_cfg(tmp_path, resume="auto", ckpt_path="/x/explicit.ckpt")) == "/x/explicit.ckpt"


def test_explicit_paths(tmp_path):
    write_checkpoint_file({"global_step": 1}, tmp_path / "a" / "s1.ckpt")
    assert resolve_resume(_cfg(tmp_path, resume=str(tmp_path / "a"))).endswith("s1.ckpt")
    assert resolve_resume(_cfg(tmp_path, resume=str(tmp_path / "a" / "s1.ckpt"))).endswith("s1.ckpt")
    with pytest.raises(ConfigError, match="resume='/nope'"):
        resolve_resume(_cfg(tmp_path, resume="/nope"))
    (tmp_path / "a" / "s1.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a valid checkpoint"):
        resolve_resume(_cfg(tmp_path, resume=str(tmp_path / "a" / "s1.ckpt")))


def test_run_id_follows_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert run_id("2026-01-01_00-00-00") == "2026-01-01_00-00-00"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert run_id("ts") == "ts"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    assert run_id("ts") == "torchrun-job42"
