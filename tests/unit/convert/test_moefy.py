"""moefy: which modules it finds, what it builds, and the errors it gives."""

from __future__ import annotations

import pytest
import torch
from dense_zoo import GELUMLP, Block, FusedSwiGLU, GeGLU, SwiGLU, TinyLM, sequential_mlp
from torch import nn

from moe_plugin import MoE, moefy
from moe_plugin.convert import FFNLayout, find_ffns
from moe_plugin.layers.experts import GroupedExperts
from moe_plugin.layers.mlp_experts import GroupedMLPExperts


@pytest.mark.parametrize(
    "ffn, layout, experts_type",
    [
        (SwiGLU, FFNLayout(gate="w1", up="w3", down="w2"), GroupedExperts),
        (GeGLU, FFNLayout(gate="gate_proj", up="up_proj", down="down_proj"), GroupedMLPExperts),
        (FusedSwiGLU, FFNLayout(up="gate_up_proj", down="down_proj", fused=True), GroupedMLPExperts),
        (GELUMLP, FFNLayout(up="fc1", down="fc2"), GroupedMLPExperts),
        (sequential_mlp, FFNLayout(up="0", down="2"), GroupedMLPExperts),
    ],
)
def test_default_layouts_are_found_and_replaced(ffn, layout, experts_type):
    model = TinyLM(ffn)
    found = find_ffns(model)
    assert [(n, lay) for n, _, lay in found] == [(f"blocks.{i}.ffn", layout) for i in range(3)]
    out = moefy(model, num_experts=4, top_k=2)
    assert out is model
    for b in model.blocks:
        assert isinstance(b.ffn, MoE)
        assert isinstance(b.ffn.experts, experts_type)
        assert b.ffn.experts.w_up_EDF.shape == (4, 16, 64)  # default expert width: the dense width
    assert model(torch.randint(0, 50, (2, 5))).shape == (2, 5, 50)


def test_moe_knobs_are_passed_through():
    model = moefy(
        TinyLM(SwiGLU),
        num_experts=6,
        top_k=3,
        expert_hidden_size=8,
        num_shared_experts=2,
        shared_expert_hidden_size=4,
        shared_expert_gate=True,
        norm_topk_prob=False,
        aux_loss_coef=0.5,
        z_loss_coef=0.25,
    )
    moe = model.blocks[1].ffn
    assert (moe.num_experts, moe.top_k, moe.aux_loss_coef, moe.z_loss_coef) == (6, 3, 0.5, 0.25)
    assert moe.experts.w_gate_EDF.shape == (6, 16, 8)
    assert moe.shared_experts.down_proj.in_features == 8
    assert moe.shared_expert_gate is not None and moe.router.norm_topk_prob is False


def test_granularity_sets_the_expert_width():
    model = moefy(TinyLM(SwiGLU), num_experts=8, top_k=4, granularity=4)
    assert model.blocks[0].ffn.experts.ffn_hidden_size == 16
    model = moefy(TinyLM(SwiGLU), num_experts=8, top_k=4, granularity=2, num_shared_experts=2)
    assert model.blocks[0].ffn.experts.ffn_hidden_size == 16  # 64 = (2 shared + 2 routed) * 16


def test_target_regex_type_every_and_skip_first():
    model = moefy(TinyLM(SwiGLU, layers=4), target=r"blocks\.(1|3)\.ffn")
    assert [isinstance(b.ffn, MoE) for b in model.blocks] == [False, True, False, True]
    model = moefy(TinyLM(GELUMLP, layers=4), target=GELUMLP, every=2, skip_first=1)
    assert [isinstance(b.ffn, MoE) for b in model.blocks] == [False, True, False, True]
    model = moefy(TinyLM(SwiGLU, layers=2), enabled=False)
    assert not any(isinstance(m, MoE) for m in model.modules())


def test_custom_layout_names():
    class Odd(nn.Module):
        def __init__(self, d: int, f: int) -> None:
            super().__init__()
            self.a = nn.Linear(d, f)
            self.b = nn.Linear(f, d)
            self.nl = nn.ReLU()

        def forward(self, x):
            return self.b(self.nl(self.a(x)))

    model = TinyLM(Odd)
    with pytest.raises(ValueError, match="no feed-forward block matched"):
        moefy(model)
    moefy(model, layout={"up": "a", "down": "b"})
    assert isinstance(model.blocks[0].ffn, MoE)
    assert isinstance(model.blocks[0].ffn.experts.activation, nn.ReLU)


def test_meta_device_conversion_builds_meta_moe():
    with torch.device("meta"):
        model = TinyLM(SwiGLU)
    moefy(model, num_experts=4, top_k=1)
    moe = model.blocks[0].ffn
    assert isinstance(moe, MoE)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert isinstance(moe.moefy_source.activation, nn.SiLU)
    model.to_empty(device="cpu")
    assert model(torch.randint(0, 50, (1, 3))).shape == (1, 3, 50)


def test_dtype_is_kept():
    model = moefy(TinyLM(GELUMLP).to(torch.float64), num_experts=2, top_k=1)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_error_no_match_names_the_pattern_and_lists_candidates():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 8)
            self.k = nn.Linear(8, 8)

    model = nn.Sequential(Attn(), Attn())
    with pytest.raises(ValueError, match=r"no feed-forward block matched pattern 'layers\\\.mlp'.*\['0', '1'\]"):
        moefy(model, target=r"layers\.mlp")
    with pytest.raises(ValueError, match=r"default layouts.*Candidate modules.*\['0', '1'\]"):
        moefy(model)


def test_error_target_matches_a_module_that_is_not_an_ffn():
    model = TinyLM(SwiGLU)
    with pytest.raises(
        ValueError, match=r"'blocks\.0' matches target=pattern .* not a feed-forward block.*'ffn': 'SwiGLU'"
    ):
        moefy(model, target=r"blocks\.\d+")


def test_error_ambiguous_kinds_of_ffn_and_heads_are_skipped():
    model = TinyLM(SwiGLU)
    model.adapter = GELUMLP(16, 8)
    with pytest.raises(ValueError, match=r"2 kinds.*'GELUMLP': \['adapter'\].*'SwiGLU': \['blocks.0.ffn'.*target="):
        moefy(model)
    moefy(model, target=SwiGLU)
    assert isinstance(model.blocks[2].ffn, MoE) and isinstance(model.adapter, GELUMLP)
    # A D -> F -> classes head is not an FFN: skipped by the defaults, an error when targeted.
    model = TinyLM(SwiGLU)
    model.cls = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    moefy(model)
    assert isinstance(model.cls, nn.Sequential)
    with pytest.raises(
        ValueError, match=r"'cls'.*shapes are incompatible.*: 2 produces 3 features but the block's input has 16"
    ):
        moefy(model, target="cls")


def test_gated_reading_wins_over_the_two_layer_one():
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(8, 16)
            self.up_proj = nn.Linear(8, 16)
            self.down_proj = nn.Linear(16, 8)
            self.act = nn.SiLU()

    # up_proj/down_proj alone is also a default two-layer layout; the gated one is the right reading.
    assert [lay for _, _, lay in find_ffns(nn.Sequential(Both()))] == [FFNLayout("up_proj", "down_proj", "gate_proj")]


def test_error_shared_ffn_module_is_ambiguous():
    shared = GELUMLP(8, 16)
    model = nn.ModuleList([Block(8, 16, lambda d, f: shared), Block(8, 16, lambda d, f: shared)])
    with pytest.raises(ValueError, match=r"same FFN module is reachable as '0.ffn' and '1.ffn'"):
        moefy(model)


def test_error_incompatible_shapes():
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(8, 16)
            self.up_proj = nn.Linear(8, 12)
            self.down_proj = nn.Linear(16, 4)

    with pytest.raises(ValueError, match=r"gate_proj maps 8->16 but up_proj maps 8->12.*down_proj produces 4"):
        moefy(nn.Sequential(Bad()), target="0")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=9), "top_k=9 must be between 1 and num_experts=8"),
        (dict(every=0), "every=0"),
        (dict(noise_std=-1.0), "noise_std=-1.0"),
        (dict(activation="swish2"), "activation='swish2' is unknown"),
        (dict(granularity=3), "does not split into num_shared_experts \\+ granularity = 3"),
        (dict(skip_first=3), "skip_first=3 skips all 3 matched FFNs"),
    ],
)
def test_error_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moefy(TinyLM(SwiGLU), **kwargs)


def test_error_upcycle_on_meta_points_to_load_dense_state_dict():
    with torch.device("meta"):
        model = TinyLM(SwiGLU)
    with pytest.raises(ValueError, match="meta device.*load_dense_state_dict"):
        moefy(model, upcycle=True)


def test_error_unknown_functional_activation():
    class Odd(SwiGLU):
        def forward(self, x):
            return self.w2(torch.sigmoid(self.w1(x)) * self.w3(x))

    with pytest.raises(ValueError, match="cannot tell the activation of 'blocks.0.ffn'.*activation="):
        moefy(TinyLM(Odd))
    moefy(TinyLM(Odd), activation=nn.Sigmoid(), upcycle=True)  # explicit activation: verified exact


def test_hydra_group_keys_are_moefy_arguments():
    import inspect
    from pathlib import Path

    from omegaconf import OmegaConf

    import moe_plugin

    params = set(inspect.signature(moefy).parameters)
    folder = Path(moe_plugin.__file__).parent / "conf" / "moefy"
    options = sorted(folder.glob("*.yaml"))
    assert {p.stem for p in options} >= {"none", "random", "upcycle", "upcycle_fine_grained"}
    for path in options:
        keys = set(OmegaConf.load(path)) - {"_target_", "_partial_", "defaults"}
        assert keys <= params, f"{path.name}: {keys - params} are not moefy arguments"


def test_existing_moe_layers_and_their_shared_experts_are_left_alone():
    model = moefy(TinyLM(SwiGLU, layers=2), target=r"blocks\.0\.ffn", num_shared_experts=1, num_experts=4, top_k=1)
    shared = model.blocks[0].ffn.shared_experts
    moefy(model, num_experts=4, top_k=1)  # converts blocks.1.ffn only
    assert isinstance(model.blocks[1].ffn, MoE)
    assert model.blocks[0].ffn.shared_experts is shared
    with pytest.raises(ValueError, match="no feed-forward block matched"):
        moefy(model)  # nothing dense left


def test_conversion_is_logged_with_parameter_counts(caplog):
    model = TinyLM(SwiGLU)  # 3 FFNs of 3 * 16 * 64 = 3072 parameters each
    dense = sum(p.numel() for p in model.parameters())
    with caplog.at_level("INFO", logger="moe_plugin.convert.moefy"):
        moefy(model, num_experts=4, top_k=1)
    total = sum(p.numel() for p in model.parameters())
    assert total == dense + 3 * (3 * 3072 + 4 * 16)  # 3 extra expert copies + a 4x16 router per layer
    active = total - 3 * 3 * 3072
    assert "3 FFNs -> MoE (4 experts, top-1, expert width 64): 'blocks.0.ffn' ... 'blocks.2.ffn'" in caplog.text
    assert f"parameters {dense:,} -> {total:,} total, {active:,} active per token" in caplog.text
