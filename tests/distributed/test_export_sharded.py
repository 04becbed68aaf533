"""Export and load a format-2 checkpoint (dense part in DCP, written by EP x FSDP2 sharding) directly.

A run at EP 1 x shard 2 on 2 processes writes its step-4 checkpoint with the dense state in `dense/`
(torch.distributed.checkpoint) and the experts in per-EP files. `moe-plugin convert to-hf` on the directory
must give the same tensors as on the file `moe-plugin ckpt consolidate` makes of it, and `generate`'s loader
(`load_model`) the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_runs import ok, train

from moe_plugin.cli.main import main as cli
from moe_plugin.convert.hf.source import load_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(600)]


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    return out


def test_to_hf_and_load_model_read_format2_directly(tmp_path: Path) -> None:
    run = ok(
        train(tmp_path, "v2", 2, 1, extra=("strategy.data_parallel_shard_size=2", "trainer.max_steps=4"), save_every=4)
    )
    ckpt = run.checkpoint(4)
    layout = torch.load(ckpt / "meta.pt", weights_only=True)["moe_plugin_layout"]
    assert layout["format_version"] == 2 and layout["dense_dcp"]

    single = tmp_path / "single.ckpt"
    assert cli(["ckpt", "consolidate", str(ckpt), str(single)]) == 0
    assert cli(["convert", "to-hf", str(ckpt), str(tmp_path / "hf_dir")]) == 0
    assert cli(["convert", "to-hf", str(single), str(tmp_path / "hf_file")]) == 0
    got, want = _hf_tensors(tmp_path / "hf_dir"), _hf_tensors(tmp_path / "hf_file")
    assert got.keys() == want.keys() and any("embed" in k for k in got), sorted(got)[:5]
    for k, v in want.items():
        assert torch.equal(got[k], v), k

    from_dir, from_file = load_model(ckpt).state_dict(), load_model(single).state_dict()
    assert from_dir.keys() == from_file.keys()
    for k, v in from_file.items():
        assert torch.equal(from_dir[k], v), k
