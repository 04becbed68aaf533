"""Regional compilation (parallel/compile.py): compiled blocks train to the same losses as eager ones,
with the local dispatcher (inductor, C++ backend) and under activation checkpointing; parameter names
are unchanged; a model without blocks gets a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.parallel.compile import compile_blocks, is_compiled


def _tiny() -> MoEDecoderLM:
    torch.manual_seed(0)
    return MoEDecoderLM(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        max_seq_len=32,
        norm_head=True,
        moe={"num_experts": 4, "top_k": 2, "expert_hidden_size": 32, "num_shared_experts": 1},
    )


def _losses(model: nn.Module, steps: int = 3) -> list[float]:
    from moe_plugin.layers.moe import collect_aux_losses

    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 64, (4, 17), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = []
    for _ in range(steps):
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1))
        loss = loss + collect_aux_losses(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_inductor():
    eager = _tiny()
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in compiled.named_parameters()]
    assert compile_blocks(compiled) == 2 and all(is_compiled(b) for b in compiled.layers)
    assert [n for n, _ in compiled.named_parameters()] == names  # checkpoints keep their keys
    torch.testing.assert_close(_losses(compiled), _losses(eager), atol=2e-4, rtol=2e-4)


def test_compiled_checkpointed_blocks_train_like_eager():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    eager = _tiny()
    wrapped = copy.deepcopy(eager)
    for i, block in enumerate(wrapped.layers):  # checkpoint wrapper first, then compile
        wrapped.layers[i] = checkpoint_wrapper(block)
    compile_blocks(wrapped, backend="aot_eager")  # dynamo + AOT autograd, no C++ build: quick
    torch.testing.assert_close(_losses(wrapped), _losses(eager), atol=1e-5, rtol=1e-5)
    # the routed path ran eagerly and was counted once per forward (not again by the recompute)
    moe = wrapped.layers[0]._checkpoint_wrapped_module.ffn
    assert moe.stats.tokens_per_expert_E.sum() == 4 * 16 * 2


def test_model_without_blocks_is_rejected():
    with pytest.raises(ValueError, match="no nn.ModuleList named 'layers'"):
        compile_blocks(nn.Linear(2, 2))


def test_model_compile_key_builds_compiled_blocks():
    from omegaconf import OmegaConf

    from moe_plugin.cli.compose import compose_config
    from moe_plugin.lightning.run import build_module

    cfg = compose_config(["model.compile=true", "model.num_layers=1", "logger=none"])
    module = build_module(cfg)
    assert OmegaConf.select(cfg, "model.compile") is True
    assert all(is_compiled(b) for b in module.model.layers)
