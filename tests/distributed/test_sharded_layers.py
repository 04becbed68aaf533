"""FSDP2 sharded data parallel x expert parallelism equals one process on the same global batch.

Every rank also trains the single-process reference on the whole global batch (the model is tiny), then
compares, step by step: the global loss, balance loss and z-loss, the parameters after each AdamW step
(gathered from the FSDP shards) and the Adam moments. Gradient clipping by the global norm is active
(max_norm below the gradient norm), so the clipping coefficient is checked too.

Layouts: (EP 2 x S 2), (EP 2 x S 4) and (EP 1 x S 4) on 4 ranks (experts fully sharded over their ES = W / EP
expert-data-parallel ranks), (EP 4 x S 2) on 4 ranks (EP = W: one copy of each expert, ES = 1), (EP 1 x S 2)
on 2 ranks, and (EP 2 x S 2) with activation checkpointing of every block. strategy.expert_shard_size: (EP 2 x
S 2) with ES = 1 (whole experts on both replicas, their gradients all-reduced over ER = 2) and (EP 1 x S 4) with
ES = 2 (experts HSDP: sharded over 2, replicated over 2) give the same update as ES = W / EP and one process.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed

from moe_plugin.layers.moe import collect_aux_losses, moe_layers
from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.parallel.apply import apply_expert_parallel
from moe_plugin.parallel.grads import clip_grad_norm_sharded
from moe_plugin.parallel.mesh import build_expert_parallel_mesh
from moe_plugin.parallel.recompute import apply_activation_checkpointing
from moe_plugin.parallel.sharding import apply_sharded_data_parallel

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

PER_RANK = 2
STEPS = 4
MAX_NORM = 0.5


def _model() -> MoEDecoderLM:
    torch.manual_seed(0)
    moe = {"num_experts": 8, "top_k": 2, "expert_hidden_size": 32, "num_shared_experts": 1, "routing_warmup": False}
    return MoEDecoderLM(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, head_dim=16, moe=moe)


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return lm + collect_aux_losses(model)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check(rank: int, world: int, ep: int, shard: int, recompute: str, es: int | None = None) -> None:
    model = _model()
    ref = copy.deepcopy(model)
    apply_activation_checkpointing(model, recompute)  # before sharding, as the strategy does
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    mesh = build_expert_parallel_mesh(ep, data_parallel_shard_size=shard, expert_shard_size=es)
    plan = apply_expert_parallel(model, mesh)
    sharding = apply_sharded_data_parallel(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters()]
    expert = [p for n, p in model.named_parameters() if n in plan.expert_params]
    dense = [p for n, p in model.named_parameters() if n not in plan.expert_params]
    # the dense part is really sharded: this rank holds about 1/S of each block's dense parameters
    block_attn = model.layers[0].attention.q_proj.weight
    assert block_attn.to_local().numel() * shard == block_attn.numel()
    # experts are fully sharded over all their expert-data-parallel ranks (ER = 1) unless ES is given
    want_es = world // ep if es is None else es
    assert mesh.expert_shard_size == want_es and mesh.expert_replicate_size == world // ep // want_es
    w_up = model.layers[1].ffn.experts.w_up_EDF
    assert w_up.to_local().numel() * want_es == w_up.numel()
    assert sharding.edges == [] and sharding.roots == [""]  # embedding / head below EDGE_MIN_PARAMS: in the root

    for step in range(STEPS):
        torch.manual_seed(100 + step)
        batch = torch.randint(0, 64, (world * PER_RANK, 17))
        ref_loss = _loss(ref, batch)
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)

        loss = _loss(model, batch[rank * PER_RANK : (rank + 1) * PER_RANK])
        loss.backward()
        norm = clip_grad_norm_sharded(
            dense, expert, MAX_NORM, mesh.data_parallel_replicate_size, mesh.expert_replicate_size
        )
        ref_params = dict(ref.named_parameters())
        for n, p in model.named_parameters():  # clipped gradients equal the single-process ones
            want = ref_params[n].grad
            if n in plan.expert_params:
                _, start, stop = plan.expert_params[n]
                want = want[start:stop]
            torch.testing.assert_close(_full(p.grad), want, rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"grad {n}: {m}")
        ref_opt.step()
        ref_opt.zero_grad()
        opt.step()
        opt.zero_grad()

        got = loss.detach().clone()
        dist.all_reduce(got)
        torch.testing.assert_close(got / world, ref_loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-6)
        assert float(ref_norm) > MAX_NORM  # clipping is active
        for layer, ref_layer in zip(moe_layers(model), moe_layers(ref)):
            counts = layer.stats.tokens_per_expert_E.clone()
            dist.all_reduce(counts)
            assert torch.equal(counts, ref_layer.stats.tokens_per_expert_E)

        ref_params = dict(ref.named_parameters())
        for n, p in model.named_parameters():
            want = ref_params[n].detach()
            if n in plan.expert_params:
                _, start, stop = plan.expert_params[n]
                want = want[start:stop]
            # Adam divides by sqrt(v): a gradient element near 1e-8 (summed in another order) moves its weight by
            # up to lr * 1e-3; gradients themselves are compared to 1e-5 above
            torch.testing.assert_close(_full(p.detach()), want, rtol=1e-4, atol=5e-5, msg=lambda m, n=n: f"{n}: {m}")
    ref_state = {n: ref_opt.state[p] for n, p in ref.named_parameters()}
    for n, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            want = ref_state[n][key]
            if n in plan.expert_params:
                _, start, stop = plan.expert_params[n]
                want = want[start:stop]
            torch.testing.assert_close(
                _full(opt.state[p][key]), want, rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}"
            )


@pytest.mark.parametrize(
    ("world", "ep", "shard", "recompute", "es"),
    [
        (4, 2, 2, "none", None),
        (4, 2, 4, "none", None),
        (4, 1, 4, "none", None),
        (4, 4, 2, "none", None),
        (2, 1, 2, "none", None),
        (4, 2, 2, "full", None),
        (4, 2, 2, "none", 1),  # strategy.expert_shard_size=1: whole experts, all-reduced over their 2 replicas
        (4, 1, 2, "none", 2),  # ES = 2 of DP = 4: experts sharded over 2 and replicated over 2 (HSDP)
    ],
)
def test_sharded_equals_one_process(world: int, ep: int, shard: int, recompute: str, es: int | None) -> None:
    """recompute=full: activation checkpointing of every block, recomputed (all-to-all included) in backward."""
    run_distributed(_check, world, ep, shard, recompute, es, timeout=240)


def _edges(rank: int, world: int) -> None:
    torch.manual_seed(0)
    moe = {"num_experts": 4, "top_k": 2, "expert_hidden_size": 32, "routing_warmup": False}
    kw = {"vocab_size": 512, "hidden_size": 128, "num_layers": 2, "num_heads": 2, "head_dim": 64, "moe": moe}
    mesh = build_expert_parallel_mesh(1, data_parallel_shard_size=2)
    for tied in (False, True):
        model = MoEDecoderLM(**kw, tie_embeddings=tied)
        apply_expert_parallel(model, mesh)
        plan = apply_sharded_data_parallel(model, mesh)
        # the embedding and the head are units of their own, unless tied (one parameter: it stays with the root)
        assert plan.edges == ([] if tied else ["embed_tokens", "lm_head"]), plan.edges
        assert (model.lm_head.weight is model.embed_tokens.weight) == tied
        tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(rank))
        _loss(model, tokens).backward()
        assert model.embed_tokens.weight.grad is not None and model.lm_head.weight.grad is not None


def test_embedding_and_head_units() -> None:
    run_distributed(_edges, 2, timeout=120)
