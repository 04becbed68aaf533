"""deepspeed_ep pieces that run in one process: accelerator choice, config loading, error paths, MoE param groups.

The multi-process behaviour (equality with one process, checkpoints, ZeRO 1/2/3) is in
tests/distributed/test_deepspeed_ep.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_plugin.accelerators.deepspeed_accelerator import (
    DeepSpeedAcceleratorError,
    deepspeed_accelerator_name,
    select_deepspeed_accelerator,
)
from moe_plugin.lightning.strategies.deepspeed_ep import (
    DeepSpeedExpertParallelStrategy,
    load_deepspeed_config,
)
from moe_plugin.parallel.apply import expert_parameter_names
from moe_plugin.parallel.deepspeed_groups import (
    group_name,
    mark_expert_parameters,
    regroup_scheduler_state,
    split_moe_param_groups,
    torch_optimizer_state,
)


def test_accelerator_from_vendor_layer_and_ds_accelerator_respected() -> None:
    env: dict[str, str] = {}
    assert select_deepspeed_accelerator("cpu", env) == "cpu" and env["DS_ACCELERATOR"] == "cpu"
    assert select_deepspeed_accelerator("npu", {"DS_ACCELERATOR": "npu"}) == "npu"
    with pytest.raises(DeepSpeedAcceleratorError, match="DS_ACCELERATOR=cuda but the Trainer runs on 'cpu'"):
        select_deepspeed_accelerator("cpu", {"DS_ACCELERATOR": "cuda"})
    with pytest.raises(DeepSpeedAcceleratorError, match="no accelerator for torch device type 'musa'"):
        deepspeed_accelerator_name("musa")


def test_bad_arguments_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"strategy.stage=0: deepspeed_ep runs ZeRO stages 1, 2 or 3"):
        DeepSpeedExpertParallelStrategy(stage=0)
    with pytest.raises(ValueError, match=r"strategy.stage=4: deepspeed_ep runs ZeRO stages 1, 2 or 3"):
        DeepSpeedExpertParallelStrategy(stage=4)
    assert DeepSpeedExpertParallelStrategy(stage=3).zero_stage == 3
    with pytest.raises(ValueError, match=r"strategy.expert_parallel_size=0"):
        DeepSpeedExpertParallelStrategy(expert_parallel_size=0)
    with pytest.raises(ValueError, match=r"strategy.checkpoint_format='zero'"):
        DeepSpeedExpertParallelStrategy(checkpoint_format="zero")
    with pytest.raises(ValueError, match=r"checkpoint_format=deepspeed with strategy.stage=3.*checkpoint_format=moe"):
        DeepSpeedExpertParallelStrategy(stage=3, checkpoint_format="deepspeed")
    with pytest.raises(ValueError, match=r"strategy.config='/no/such.json': no such file"):
        DeepSpeedExpertParallelStrategy(config="/no/such.json")
    with pytest.raises(ValueError, match=r"zero_optimization.stage of strategy.config=0"):
        DeepSpeedExpertParallelStrategy(config={"zero_optimization": {"stage": 0}})


def test_config_from_json_and_yaml(tmp_path: Path) -> None:
    cfg = {"zero_optimization": {"stage": 1, "overlap_comm": False}, "zero_allow_untested_optimizer": True}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    (tmp_path / "ds.yaml").write_text(
        "zero_optimization:\n  stage: 1\n  overlap_comm: false\nzero_allow_untested_optimizer: true\n"
    )
    assert load_deepspeed_config(tmp_path / "ds.json") == load_deepspeed_config(str(tmp_path / "ds.yaml")) == cfg
    strategy = DeepSpeedExpertParallelStrategy(config=str(tmp_path / "ds.yaml"), expert_parallel_size=2)
    assert strategy.zero_stage == 1 and strategy.expert_parallel_size == 2
    assert DeepSpeedExpertParallelStrategy(stage=2, offload_optimizer=True).config["zero_optimization"]["stage"] == 2


def _tiny() -> torch.nn.Module:
    from moe_plugin.models.decoder import MoEDecoderLM

    torch.manual_seed(0)
    return MoEDecoderLM(
        vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, max_seq_len=16,
        moe={"num_experts": 4, "top_k": 2, "expert_hidden_size": 8},
    )  # fmt: skip


def test_moe_param_groups_split_keeps_hyperparameters_and_schedule() -> None:
    model = _tiny()
    experts = list(expert_parameter_names(model))
    marked = mark_expert_parameters(model, experts, expert_parallel_size=2, zero_stage=3)
    assert all(p.allreduce is False and p.group_name == "ep_size_2" for p in marked)
    assert all(p.ds_zero_placement_family == "autoep_expert" for p in marked)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s + 1))
    before = [g["lr"] for g in opt.param_groups]
    origin = split_moe_param_groups(opt, sched)
    assert origin == [0, 1, 0]  # dense decay, dense no-decay, experts (all 3-D: from the decay group)
    moe = opt.param_groups[2]
    assert moe["moe"] is True and moe["name"] == group_name(2) and moe["weight_decay"] == 0.1
    assert {id(p) for p in moe["params"]} == {id(p) for p in marked}
    assert "moe" not in opt.param_groups[0] and "name" not in opt.param_groups[0]
    assert [g["lr"] for g in opt.param_groups] == [before[o] for o in origin]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25, 0.25]
    with pytest.raises(RuntimeError, match="before the optimizer has state"):
        split_moe_param_groups(opt)


def test_scheduler_state_and_optimizer_state_by_original_groups() -> None:
    state = {"base_lrs": [1.0, 2.0, 1.0], "_last_lr": [0.5, 1.0, 0.5], "last_epoch": 3, "lr_lambdas": [None] * 3}
    orig = regroup_scheduler_state(state, [0, 1, 0], to_original=True)
    assert orig == {"base_lrs": [1.0, 2.0], "_last_lr": [0.5, 1.0], "last_epoch": 3, "lr_lambdas": [None, None]}
    assert regroup_scheduler_state(orig, [0, 1, 0], to_original=False) == state
    names = [["a", "e"], ["b"]]
    st = {n: {"exp_avg": torch.full((2,), float(i))} for i, n in enumerate(["a", "b", "e"])}
    osd = torch_optimizer_state(st, 7.0, names, [{"lr": 1.0}, {"lr": 2.0}])
    assert osd["param_groups"] == [{"lr": 1.0, "params": [0, 1]}, {"lr": 2.0, "params": [2]}]
    assert float(osd["state"][1]["step"]) == 7.0 and torch.equal(osd["state"][1]["exp_avg"], st["e"]["exp_avg"])
    assert torch_optimizer_state(st, None, names, [{}, {}])["state"] == {}  # before the first step: no state


def test_moe_layers_become_zero3_leaf_modules() -> None:
    """ZeRO-3 gathers a leaf module's parameters (router, experts, shared experts) for its whole forward/backward:
    the router's dataclass output would otherwise hide the router from ZeRO-3's backward gather."""
    from deepspeed.utils import get_z3_leaf_modules

    from moe_plugin.layers.moe import moe_layers
    from moe_plugin.parallel.deepspeed_engine import mark_moe_layers_as_zero3_leaves

    model = _tiny()
    assert mark_moe_layers_as_zero3_leaves(model) == len(moe_layers(model)) > 0
    assert get_z3_leaf_modules(model) == moe_layers(model)
