"""Meta-device construction and layout-independent init: the gathered weights equal one process bit for bit.

Each rank builds the model under meta_init_context (matrices take no memory), shards it (experts by id,
FSDP2 over the dense part and the experts), materialises only its shards, then gathers them and compares
with a single-process model materialised with the same seed. Layouts: (EP 2 x shard 2) on 4 ranks
(whole experts per shard), (EP 1 x shard 4) on 4 ranks with 2 experts (each expert split on dim 1), and
(EP 2, DDP) on 2 ranks.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.parallel.apply import apply_expert_parallel
from moe_plugin.parallel.materialise import derived_seed, materialise_, meta_init_context
from moe_plugin.parallel.mesh import build_expert_parallel_mesh
from moe_plugin.parallel.sharding import apply_sharded_data_parallel

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

SEED = 1234


def _model(num_experts: int) -> MoEDecoderLM:
    moe = {"num_experts": num_experts, "top_k": 2, "expert_hidden_size": 24, "num_shared_experts": 1}
    moe.update({"expert_bias": True, "routing_warmup": True, "routing_warmup_steps": 5})
    return MoEDecoderLM(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, head_dim=16, moe=moe)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check(rank: int, world: int, ep: int, shard: int, num_experts: int) -> None:
    torch.manual_seed(rank)  # ranks seeded differently: the init must not depend on it
    with meta_init_context():
        model = _model(num_experts)
    assert model.embed_tokens.weight.is_meta and model.layers[0].ffn.experts.w_up_EDF.is_meta
    assert not model.norm.weight.is_meta  # vectors are built for real (their constructor values)
    mesh = build_expert_parallel_mesh(ep, data_parallel_shard_size=shard)
    plan = apply_expert_parallel(model, mesh)
    if shard > 1:
        apply_sharded_data_parallel(model, mesh)
    names = materialise_(model, SEED, "cpu", plan.expert_params)
    assert "embed_tokens.weight" in names
    if shard > 1:  # this rank allocated only its shard
        w = model.layers[0].ffn.experts.w_up_EDF
        assert w.to_local().numel() * mesh.expert_shard_size == w.numel()

    with meta_init_context():
        ref = _model(num_experts)
    materialise_(ref, SEED)
    want = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        full = _full(p.detach())
        expected = want[n].detach()
        if n in plan.expert_params:
            _, start, stop = plan.expert_params[n]
            expected = expected[start:stop]
        assert torch.equal(full, expected), f"{n} differs from the single-process init"
    for (n, b), (_, rb) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, rb), n


@pytest.mark.parametrize(("world", "ep", "shard", "experts"), [(4, 2, 2, 8), (4, 1, 4, 2), (2, 2, 1, 4)])
def test_layout_independent_init(world: int, ep: int, shard: int, experts: int) -> None:
    run_distributed(_check, world, ep, shard, experts, timeout=240)


def test_init_is_the_models_rule_with_derived_generators() -> None:
    """One process: each matrix is the model's init_parameter_ drawn from H(seed, name[, expert])."""
    with meta_init_context():
        model = _model(4)
    materialise_(model, SEED)
    w = model.layers[1].attention.o_proj.weight
    g = torch.Generator().manual_seed(derived_seed(SEED, "layers.1.attention.o_proj.weight"))
    std = model.init_std / (2 * model.num_layers) ** 0.5
    assert torch.equal(w, torch.empty_like(w).normal_(0, std, generator=g))
    e = model.layers[0].ffn.experts.w_gate_EDF
    g = torch.Generator().manual_seed(derived_seed(SEED, "layers.0.ffn.experts.w_gate_EDF", 3))
    assert torch.equal(e[3], torch.empty_like(e[3]).normal_(0, model.init_std, generator=g))
    assert torch.equal(model.norm.weight, torch.ones(32))
    assert float(w.std()) > 0  # not left empty


def test_meta_model_without_init_rule_fails_clearly() -> None:
    with meta_init_context():
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="init_parameter_"):
        materialise_(model, SEED)
