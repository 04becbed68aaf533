"""Sparse upcycling: the converted model computes what the dense one did, exactly, in every recipe."""

from __future__ import annotations

import pytest
import torch
from dense_zoo import GELUMLP, FusedSwiGLU, GeGLU, SwiGLU, TinyLM, scramble_, sequential_mlp
from torch import nn

from moe_plugin import MoE, collect_aux_losses, moefy
from moe_plugin.convert import load_dense_state_dict
from moe_plugin.convert.ffn import read_ffn
from moe_plugin.convert.moefy import dense_forward
from moe_plugin.layers.mlp_experts import GroupedMLPExperts

FFNS = [SwiGLU, GeGLU, FusedSwiGLU, GELUMLP, sequential_mlp]
# (num_experts, top_k, granularity): plain upcycling, top-1, and fine-grained splits of the dense FFN.
RECIPES = [(4, 2, 1), (8, 1, 1), (8, 4, 4), (8, 4, 2), (16, 8, 4)]


def _dense_and_ids(ffn, seed: int = 0):
    torch.manual_seed(seed)
    model = scramble_(TinyLM(ffn), seed=seed).eval()
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(seed))
    return model, ids


@pytest.mark.parametrize("ffn", FFNS, ids=lambda f: getattr(f, "__name__", "Sequential"))
@pytest.mark.parametrize("num_experts, top_k, granularity", RECIPES)
def test_upcycled_logits_equal_dense_logits_fp32(ffn, num_experts, top_k, granularity):
    model, ids = _dense_and_ids(ffn)
    with torch.no_grad():
        dense = model(ids)
    moefy(model, num_experts=num_experts, top_k=top_k, granularity=granularity, upcycle=True)
    assert all(isinstance(b.ffn, MoE) for b in model.blocks)
    with torch.no_grad():
        moe = model(ids)
    assert dense.abs().max() > 1.0  # the comparison is not between near-zero tensors
    torch.testing.assert_close(moe, dense, rtol=0, atol=1e-5)


def test_fine_grained_routing_picks_whole_virtual_groups():
    model, ids = _dense_and_ids(SwiGLU)
    moefy(model, num_experts=16, top_k=8, granularity=4, upcycle=True)
    moe = model.blocks[1].ffn
    x = torch.randn(64, 16)
    routing = moe.router(x)
    groups_TK = routing.topk_ids_TK // 4
    segments_TK = routing.topk_ids_TK % 4
    # Two whole groups per token: each chosen group contributes its 4 segments once.
    for t in range(64):
        for g in groups_TK[t].unique():
            assert sorted(segments_TK[t][groups_TK[t] == g].tolist()) == [0, 1, 2, 3]
    # Segments of one expert are disjoint slices of the dense FFN, scaled by G on the way out.
    dense = read_ffn(SwiGLU(16, 64), model.blocks[1].ffn.moefy_source.layout)
    assert dense.ffn_hidden_size == 4 * moe.experts.ffn_hidden_size


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_take_their_slice_of_the_dense_ffn(gate):
    model, ids = _dense_and_ids(SwiGLU)
    with torch.no_grad():
        dense = model(ids)
    # 64 = 1 shared * 16 + 3 segments * 16; top-3 of 6 experts picks one whole copy of the routed part.
    moefy(model, num_experts=6, top_k=3, granularity=3, num_shared_experts=1, shared_expert_gate=gate, upcycle=True)
    assert model.blocks[0].ffn.shared_experts is not None
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense, rtol=0, atol=1e-5)


def test_gpt2_style_conv1d_and_biases_are_read_in_the_right_orientation():
    class Conv1D(nn.Module):  # the shape of transformers.pytorch_utils.Conv1D: weight [in, out]
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.randn(nf))

        def forward(self, x):
            return x @ self.weight + self.bias

    class GPT2MLP(nn.Module):
        def __init__(self, d: int, f: int) -> None:
            super().__init__()
            self.c_fc = Conv1D(f, d)
            self.c_proj = Conv1D(d, f)
            self.act = nn.GELU(approximate="tanh")
            self.dropout = nn.Dropout(0.1)

        def forward(self, x):
            return self.dropout(self.c_proj(self.act(self.c_fc(x))))

    model, ids = _dense_and_ids(GPT2MLP)
    with torch.no_grad():
        dense = model(ids)
    moefy(model, num_experts=4, top_k=2, granularity=2, upcycle=True)
    assert model.blocks[0].ffn.moefy_source.conv1d
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense, rtol=0, atol=1e-5)


def test_noise_breaks_symmetry_by_a_controlled_amount():
    model, ids = _dense_and_ids(SwiGLU)
    with torch.no_grad():
        dense = model(ids)
    moefy(model, num_experts=4, top_k=2, upcycle=True, noise_std=0.01)
    w = model.blocks[0].ffn.experts.w_up_EDF
    assert not torch.equal(w[0], w[1])
    rel = ((w[0] - w[1]).std() / w[0].std()).item()
    assert 0.005 < rel < 0.03  # about sqrt(2) * 0.01
    with torch.no_grad():
        diff = (model(ids) - dense).abs().max().item()
    assert 1e-5 < diff < 0.1 * dense.abs().max().item()


def test_without_renormalisation_the_start_is_not_exact_and_says_so():
    model, ids = _dense_and_ids(SwiGLU)
    with torch.no_grad():
        dense = model(ids)
    with pytest.warns(UserWarning, match="norm_topk_prob=False"):
        moefy(model, num_experts=4, top_k=2, norm_topk_prob=False, upcycle=True)
    with torch.no_grad():
        assert (model(ids) - dense).abs().max() > 1e-2


def test_upcycled_gradients_match_the_dense_ffn_gradients():
    """At the start, d loss / d input of each layer is the dense one, and the expert grads sum to it."""
    torch.manual_seed(0)
    ffn = scramble_(GeGLU(16, 64))
    holder = nn.Sequential(GeGLU(16, 64))
    holder[0].load_state_dict(ffn.state_dict())
    moefy(holder, num_experts=4, top_k=2, granularity=2, upcycle=True)
    moe = holder[0]
    x1 = torch.randn(32, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    ffn(x1).pow(2).sum().backward()
    moe(x2).pow(2).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    # Down-bias gradient: every token's weights sum to 1, so the experts' bias grads sum to the dense one.
    torch.testing.assert_close(moe.experts.b_down_ED.grad.sum(0), ffn.down_proj.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["loop", "auto"])
@pytest.mark.parametrize("gated", [True, False])
def test_mlp_experts_match_a_loop_of_linear_modules_outputs_and_grads(backend, gated):
    torch.manual_seed(0)
    experts = GroupedMLPExperts(3, 8, 12, nn.GELU(), gated=gated, bias=True, grouped_mm_backend=backend)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_()
    counts = torch.tensor([5, 0, 7])
    x = torch.randn(12, 8, requires_grad=True)
    out = experts(x, counts)
    ref = []
    for e, xs in enumerate(torch.split(x, counts.tolist())):
        up = xs @ experts.w_up_EDF[e] + experts.b_up_EF[e]
        if gated:
            h = nn.functional.gelu(xs @ experts.w_gate_EDF[e] + experts.b_gate_EF[e]) * up
        else:
            h = nn.functional.gelu(up)
        ref.append(h @ experts.w_down_EFD[e] + experts.b_down_ED[e])
    ref = torch.cat(ref)
    torch.testing.assert_close(out, ref)
    params = [x, experts.w_up_EDF, experts.b_up_EF, experts.w_down_EFD, experts.b_down_ED]
    g_out = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(), params)
    g_ref = torch.autograd.grad((ref * torch.arange(ref.numel()).view_as(ref).sin()).sum(), params)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b)


def test_dense_forward_reference_equals_the_module():
    torch.manual_seed(0)
    for ffn in (SwiGLU(8, 16), GeGLU(8, 16), GELUMLP(8, 16).eval()):
        from moe_plugin.convert import find_ffns

        _, module, layout = find_ffns(nn.Sequential(ffn))[0]
        from moe_plugin.convert.ffn import find_activation

        dense = read_ffn(module, layout, find_activation(module, layout) or nn.SiLU())
        x = torch.randn(4, 8)
        torch.testing.assert_close(dense_forward(dense, x), ffn(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=8, top_k=3, granularity=4), "multiples of 4.*num_experts=8, top_k=3"),
        (dict(num_experts=6, top_k=4, granularity=4), "multiples of 4.*num_experts=6, top_k=4"),
        (dict(num_experts=4, top_k=2, expert_hidden_size=48), "rest \\(64\\) must split into whole experts"),
    ],
)
def test_upcycle_errors_name_the_knob(kwargs, match):
    model, _ = _dense_and_ids(SwiGLU)
    with pytest.raises(ValueError, match=match):
        moefy(model, upcycle=True, **kwargs)


def test_shared_experts_need_a_swiglu_dense_ffn():
    model, _ = _dense_and_ids(GELUMLP)
    with pytest.raises(ValueError, match="shared experts are SwiGLU.*Set num_shared_experts=0"):
        moefy(model, num_experts=6, top_k=3, granularity=3, num_shared_experts=1, upcycle=True)


def test_verification_catches_a_forward_that_is_not_the_plain_ffn():
    class Scaled(SwiGLU):
        def forward(self, x):
            return 0.5 * super().forward(x)

    model, _ = _dense_and_ids(Scaled)
    with pytest.raises(ValueError, match="differs from it by .* verify=False"):
        moefy(model, upcycle=True, activation="silu")


@pytest.mark.parametrize("ffn", [GeGLU, FusedSwiGLU])
def test_meta_build_then_load_dense_checkpoint_equals_dense(ffn):
    _meta_build_then_load(ffn)


def test_meta_build_resets_router_buffers_before_upcycling():
    _meta_build_then_load(SwiGLU, expert_bias=True, routing_warmup=True, routing_warmup_steps=10)


def _meta_build_then_load(ffn, **moe_kwargs):
    dense_model, ids = _dense_and_ids(ffn)
    with torch.no_grad():
        dense = dense_model(ids)
    with torch.device("meta"):
        model = TinyLM(ffn)
    act = "silu" if ffn in (FusedSwiGLU, SwiGLU) else None  # on meta nothing can be probed
    moefy(model, num_experts=8, top_k=4, granularity=4, activation=act, **moe_kwargs)
    model.to_empty(device="cpu")
    with torch.no_grad():  # to_empty leaves whatever was in memory: make that as bad as it gets
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan")) if t.is_floating_point() else t.fill_(7)
    names = load_dense_state_dict(model, dense_model.state_dict())
    assert names == [f"blocks.{i}.ffn" for i in range(3)]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense, rtol=0, atol=1e-5)
    # The converted model then trains: aux losses are there and gradients reach every expert.
    model.train()
    loss = model(ids).logsumexp(-1).mean() + collect_aux_losses(model)
    loss.backward()
    assert model.blocks[0].ffn.experts.w_up_EDF.grad.abs().sum() > 0
    assert model.blocks[0].ffn.router.weight.grad is not None


def test_load_dense_state_dict_errors():
    dense_model, _ = _dense_and_ids(SwiGLU)
    model = moefy(TinyLM(SwiGLU), num_experts=2, top_k=1)
    sd = dense_model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"unexpected keys \['extra.weight'\]"):
        load_dense_state_dict(model, sd)
    with torch.device("meta"):
        meta = moefy(TinyLM(SwiGLU), num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="to_empty"):
        load_dense_state_dict(meta, dense_model.state_dict())


@pytest.mark.parametrize(
    "moe_kwargs",
    [
        dict(routing_scale=2.5),
        dict(score_func="sigmoid"),
        dict(expert_bias=True),
        dict(num_expert_groups=2, topk_groups=1),
        dict(balance_loss_type="global_batch"),
    ],
    ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()),
)
@pytest.mark.parametrize("num_experts, top_k, granularity", [(8, 2, 1), (8, 4, 4)])
def test_upcycling_stays_exact_with_router_variants(moe_kwargs, num_experts, top_k, granularity):
    model, ids = _dense_and_ids(GeGLU)
    with torch.no_grad():
        dense = model(ids)
    moefy(model, num_experts=num_experts, top_k=top_k, granularity=granularity, upcycle=True, **moe_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense, rtol=0, atol=1e-5)


def test_token_dropping_warns_instead_of_failing_verification():
    model, _ = _dense_and_ids(SwiGLU)
    with pytest.warns(UserWarning, match="capacity_factor=1.0 drops token copies"):
        moefy(model, num_experts=4, top_k=2, upcycle=True, capacity_factor=1.0)


def test_bf16_model_upcycles_within_bf16_rounding():
    model, ids = _dense_and_ids(GELUMLP)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        dense = model(ids).float()
    moefy(model, num_experts=4, top_k=2, granularity=2, upcycle=True)  # verification at bf16 tolerance
    assert model.blocks[0].ffn.experts.w_up_EDF.dtype == torch.bfloat16
    with torch.no_grad():
        diff = (model(ids).float() - dense).abs().max().item()
    assert diff < 0.05 * dense.abs().max().item()
