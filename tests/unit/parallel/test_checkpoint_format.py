"""Sharded checkpoint format: save at one layout, load at any other, in one process.

Per-rank checkpoints of an EP=2 run are simulated by slicing a real model's state and AdamW state (what
each rank holds); loading them at EP=4, EP=1 and consolidating must give back exactly the full state.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.parallel.apply import expert_parameter_names
from moe_plugin.parallel.checkpoint import (
    CheckpointFormatError,
    ShardedLayout,
    consolidate,
    describe,
    load_for_rank,
    optimizer_param_names,
    save_sharded,
)

E = 4


def _trained() -> tuple[MoEDecoderLM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MoEDecoderLM(
        vocab_size=32,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        moe={"num_experts": E, "top_k": 2, "expert_hidden_size": 8},
    )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
    )
    for _ in range(2):
        model(torch.randint(0, 32, (2, 8))).square().mean().backward()
        opt.step()
    return model, opt


def _full_checkpoint(model, opt) -> dict:
    return {
        "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "global_step": 2,
        "LMDataModule": {"epoch": 0, "samples": 16},
    }


def _rank_checkpoint(full: dict, experts: dict[str, tuple[int, int, int]], names: list[list[str]]) -> dict:
    """What a rank holding experts[name] = (E, start, stop) has in its Lightning checkpoint dict."""
    flat = [n for g in names for n in g]
    sd = {k: (v[experts[k][1] : experts[k][2]] if k in experts else v) for k, v in full["state_dict"].items()}
    osd = full["optimizer_states"][0]
    state = {}
    for i, st in osd["state"].items():
        n = flat[i]
        state[i] = {k: (v[experts[n][1] : experts[n][2]] if n in experts and v.dim() > 0 else v) for k, v in st.items()}
    return {**full, "state_dict": sd, "optimizer_states": [{"state": state, "param_groups": osd["param_groups"]}]}


def _ranges(model, ep: int, ep_rank: int) -> dict[str, tuple[int, int, int]]:
    return {n: (e, ep_rank * e // ep, (ep_rank + 1) * e // ep) for n, e in expert_parameter_names(model).items()}


def _save_ep(tmp: Path, model, opt, ep: int, world: int) -> Path:
    full = _full_checkpoint(model, opt)
    names = [optimizer_param_names(opt, model)]
    path = tmp / "step2.ckpt"
    for rank in range(world):
        experts = _ranges(model, ep, rank % ep)
        save_sharded(
            _rank_checkpoint(full, experts, names[0]), path, ShardedLayout(world, rank, ep, experts), names, torch.save
        )
    return path


def _load(p: str) -> dict:
    return torch.load(p, weights_only=False)


def _assert_state_equal(got: dict, want: dict) -> None:
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for k, v in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=0, atol=0)
    g, w = got["optimizer_states"][0], want["optimizer_states"][0]
    assert g["param_groups"] == w["param_groups"]
    assert g["state"].keys() == w["state"].keys()
    for i in w["state"]:
        for k in w["state"][i]:
            torch.testing.assert_close(g["state"][i][k], w["state"][i][k], rtol=0, atol=0)


def test_layout_and_files(tmp_path: Path) -> None:
    model, opt = _trained()
    path = _save_ep(tmp_path, model, opt, ep=2, world=4)
    assert sorted(p.name for p in path.iterdir()) == ["experts-ep000-of-002.pt", "experts-ep001-of-002.pt", "meta.pt"]
    meta = _load(str(path / "meta.pt"))
    assert not any(".experts." in k for k in meta["state_dict"])  # no expert tensor in meta
    assert meta["moe_plugin_layout"]["num_experts"] == {"layers.0.ffn": E, "layers.1.ffn": E}
    shard = _load(str(path / "experts-ep001-of-002.pt"))
    assert shard["experts"]["layers.0.ffn.experts.w_up_EDF"]["start"] == 2
    info = describe(path, _load)
    assert info["expert_parallel_size"] == 2 and info["world_size"] == 4 and info["missing_files"] == []
    assert info["data_position"] == {"epoch": 0, "samples": 16}


@pytest.mark.parametrize("save_ep,load_ep", [(2, 1), (2, 4), (1, 2), (4, 2)])
def test_reshard(tmp_path: Path, save_ep: int, load_ep: int) -> None:
    model, opt = _trained()
    full = _full_checkpoint(model, opt)
    names = [optimizer_param_names(opt, model)]
    path = _save_ep(tmp_path, model, opt, ep=save_ep, world=save_ep)
    for r in range(load_ep):
        experts = _ranges(model, load_ep, r)
        got = load_for_rank(path, experts, names, _load)
        _assert_state_equal(got, _rank_checkpoint(full, experts, names[0]))
        assert got["global_step"] == 2 and got["LMDataModule"] == {"epoch": 0, "samples": 16}


def test_plain_file_loads_at_ep2(tmp_path: Path) -> None:
    model, opt = _trained()
    full = _full_checkpoint(model, opt)
    names = [optimizer_param_names(opt, model)]
    torch.save(full, tmp_path / "plain.ckpt")
    experts = _ranges(model, 2, 1)
    got = load_for_rank(tmp_path / "plain.ckpt", experts, names, _load)
    _assert_state_equal(got, _rank_checkpoint(full, experts, names[0]))


def test_consolidate_gives_the_plain_checkpoint(tmp_path: Path) -> None:
    model, opt = _trained()
    path = _save_ep(tmp_path, model, opt, ep=2, world=2)
    got = consolidate(path, _load)
    _assert_state_equal(got, _full_checkpoint(model, opt))
    assert "moe_plugin_layout" not in got
    model2, opt2 = _trained()
    model2.load_state_dict(got["state_dict"])  # and plain torch takes it
    opt2.load_state_dict(got["optimizer_states"][0])


def test_errors(tmp_path: Path) -> None:
    model, opt = _trained()
    names = [optimizer_param_names(opt, model)]
    path = _save_ep(tmp_path, model, opt, ep=2, world=2)
    wrong = {n: (8, 0, 4) for n in expert_parameter_names(model)}
    with pytest.raises(CheckpointFormatError, match="stores 4 experts.*model.moe.num_experts"):
        load_for_rank(path, wrong, names, _load)
    (path / "meta.pt").unlink()
    with pytest.raises(CheckpointFormatError, match="without meta.pt"):
        load_for_rank(path, _ranges(model, 2, 0), names, _load)
