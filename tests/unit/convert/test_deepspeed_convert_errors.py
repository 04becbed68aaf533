"""`moe-plugin ckpt convert` error paths (the conversions themselves run in tests/distributed/test_deepspeed_ep.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_plugin.cli.main import main as cli
from moe_plugin.convert.deepspeed_checkpoint import DeepSpeedCheckpointError, to_deepspeed_directory
from moe_plugin.parallel.deepspeed_export import export_deepspeed_checkpoint


def test_layout_free_source_needs_the_target_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "optimizer_states": []}, src)
    assert cli(["ckpt", "convert", str(src), str(tmp_path / "ds")]) == 2
    assert "give the target layout: --world-size W" in capsys.readouterr().out
    assert cli(["ckpt", "convert", str(tmp_path / "nope"), str(tmp_path / "ds")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_export_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    src = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "optimizer_states": [{"state": {}, "param_groups": []}]}, src)
    with pytest.raises(DeepSpeedCheckpointError, match="carries no model_config"):
        to_deepspeed_directory(str(src), str(tmp_path / "ds"), 2, 1, 2)
    plain = {"state_dict": {}, "optimizer_states": [{"state": {}, "param_groups": []}]}
    with pytest.raises(ValueError, match="--stage 3: DeepSpeed directories are written .* for ZeRO stages 1 and 2"):
        export_deepspeed_checkpoint(plain, tmp_path / "ds", dict, [], 2, 1, 3)
    with pytest.raises(ValueError, match="no optimizer state"):
        export_deepspeed_checkpoint({"state_dict": {}}, tmp_path / "ds", dict, [], 2, 1, 2)
    with pytest.raises(Exception, match="expert_parallel_size"):
        export_deepspeed_checkpoint(plain, tmp_path / "ds", dict, [], 3, 2, 2)
