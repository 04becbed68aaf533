"""Expert-parallel gradients and losses equal one process on the same global batch.

DDP wraps the model with the experts excluded; experts are reduced by reduce_expert_gradients. Checks:
- expert gradients are NOT averaged by DDP (with EP=1 the replicas' raw gradients differ across ranks);
- global loss, balance loss and z-loss equal the single-process values (router counts summed over ranks);
- after reduction, dense and expert gradients equal the single-process gradients, at EP=1, 2 and 4;
- clipping by global norm sees every expert once (same norm and clipped gradients as one process).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch.nn.parallel import DistributedDataParallel

from moe_plugin.layers.moe import collect_aux_losses, moe_layers
from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.parallel.apply import apply_expert_parallel
from moe_plugin.parallel.grads import clip_grad_norm_expert_parallel, exclude_from_ddp, reduce_expert_gradients
from moe_plugin.parallel.mesh import build_expert_parallel_mesh

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

PER_RANK = 2


def _model() -> MoEDecoderLM:
    torch.manual_seed(0)
    moe = {"num_experts": 8, "top_k": 2, "expert_hidden_size": 32, "num_shared_experts": 1}
    return MoEDecoderLM(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, head_dim=16, moe=moe)


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(tokens[:, :-1])
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return lm, collect_aux_losses(inner)


def _check(rank: int, world: int, ep: int) -> None:
    model = _model()
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    batch = torch.randint(0, 64, (world * PER_RANK, 17))
    lm_ref, aux_ref = _loss(ref, batch)
    (lm_ref + aux_ref).backward()
    ref_stats = [dict(m.stats.losses) for m in moe_layers(ref)]

    mesh = build_expert_parallel_mesh(ep)
    plan = apply_expert_parallel(model, mesh)
    exclude_from_ddp(model, plan.expert_params)
    ddp = DistributedDataParallel(model)
    lm, aux = _loss(ddp, batch[rank * PER_RANK : (rank + 1) * PER_RANK])
    (lm + aux).backward()

    # losses: the mean over ranks is the single-process value (counts are global, P averages)
    vals = torch.stack([lm.detach(), aux.detach()])
    dist.all_reduce(vals)
    torch.testing.assert_close(vals / world, torch.stack([lm_ref, aux_ref]).detach(), rtol=1e-5, atol=1e-6)
    for layer, stats in zip(moe_layers(model), ref_stats):
        got = torch.stack([layer.stats.losses["balance_loss"], layer.stats.losses["z_loss"]])
        dist.all_reduce(got)
        torch.testing.assert_close(
            got / world, torch.stack([stats["balance_loss"], stats["z_loss"]]), rtol=1e-5, atol=1e-6
        )
    for layer, ref_layer in zip(moe_layers(model), moe_layers(ref)):
        # load statistics: per-rank counts that sum (ExpertLoad reduces them) to the single-process counts
        counts = layer.stats.tokens_per_expert_E.clone()
        assert int(counts.sum()) == PER_RANK * 16 * 2
        dist.all_reduce(counts)
        assert torch.equal(counts, ref_layer.stats.tokens_per_expert_E)

    names = dict(model.named_parameters())
    ref_params = dict(ref.named_parameters())
    expert = [names[n] for n in plan.expert_params]
    if ep == 1:  # replicas: DDP averaging would make the raw gradients identical on every rank
        g = names["layers.0.ffn.experts.w_up_EDF"].grad.clone()
        gathered = [torch.empty_like(g) for _ in range(world)]
        dist.all_gather(gathered, g)
        assert not torch.allclose(gathered[0], gathered[1]), "expert gradients were averaged by DDP"
    reduce_expert_gradients(expert, mesh.expert_data_group, world)
    for n, p in names.items():
        expected = ref_params[n].grad
        if n in plan.expert_params:
            _, start, stop = plan.expert_params[n]
            expected = expected[start:stop]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")

    # clipping by the global norm
    dense = [p for n, p in names.items() if n not in plan.expert_params]
    ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.05)
    norm = clip_grad_norm_expert_parallel(dense, expert, 0.05, mesh.expert_group)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-6)
    for n, p in names.items():
        expected = ref_params[n].grad
        if n in plan.expert_params:
            _, start, stop = plan.expert_params[n]
            expected = expected[start:stop]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7)


def _check_layouts(rank: int, world: int, eps: list[int]) -> None:
    for ep in eps:
        _check(rank, world, ep)


def test_gradients_match_single_process_2_procs() -> None:
    run_distributed(_check_layouts, 2, [1, 2], timeout=200)


@pytest.mark.slow
def test_gradients_match_single_process_4_procs() -> None:
    run_distributed(_check_layouts, 4, [2, 4], timeout=220)
