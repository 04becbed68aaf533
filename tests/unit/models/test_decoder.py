from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from moe_plugin.cli.compose import compose_config
from moe_plugin.layers.moe import MoE, collect_aux_losses
from moe_plugin.layers.norm_head import NormHead
from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.models.inspect import count_parameters, flops_per_token

TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32)


def _moe(**kw):
    return {"num_experts": 4, "top_k": 2, "expert_hidden_size": 16, **kw}


def test_forward_shapes_and_aux_losses() -> None:
    torch.manual_seed(0)
    model = MoEDecoderLM(**TINY, moe=_moe(num_shared_experts=1))
    logits = model(torch.randint(0, 64, (2, 8)))
    assert logits.shape == (2, 8, 64)
    aux = collect_aux_losses(model)
    assert aux is not None and aux.requires_grad and aux.item() > 0
    (logits.sum() + aux).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causality() -> None:
    torch.manual_seed(0)
    model = MoEDecoderLM(**TINY, moe=_moe())
    x = torch.randint(0, 64, (1, 10))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 64
    # with identical prefixes the logits of the prefix are identical: no position sees the future
    torch.testing.assert_close(model(x)[0, :7], model(y)[0, :7])


def test_families_by_arguments() -> None:
    dense_first = MoEDecoderLM(**TINY, first_k_dense=1, dense_ffn_hidden_size=48, moe=_moe(num_shared_experts=2))
    assert not isinstance(dense_first.layers[0].ffn, MoE) and isinstance(dense_first.layers[1].ffn, MoE)
    tied = MoEDecoderLM(**TINY, tie_embeddings=True, moe=_moe())
    assert tied.lm_head.weight is tied.embed_tokens.weight
    qwen = MoEDecoderLM(**TINY, moe=_moe(num_shared_experts=1, shared_expert_gate=True, norm_topk_prob=False))
    assert qwen.layers[0].ffn.shared_expert_gate is not None
    olmoe = MoEDecoderLM(**TINY, qk_norm=True, moe=_moe())
    assert olmoe.layers[0].attention.q_norm is not None
    assert isinstance(MoEDecoderLM(**TINY, norm_head=True, moe=_moe()).lm_head, NormHead)


def test_bad_arguments_name_the_key() -> None:
    with pytest.raises(ValueError, match="norm_head"):
        MoEDecoderLM(**TINY, norm_head=True, tie_embeddings=True, moe=_moe())
    with pytest.raises(ValueError, match="dense_ffn_hidden_size"):
        MoEDecoderLM(**TINY, first_k_dense=1, moe=_moe())
    with pytest.raises(ValueError, match="num_kv_heads"):
        MoEDecoderLM(**{**TINY, "num_kv_heads": 3}, moe=_moe())
    with pytest.raises(ValueError, match="max_seq_len"):
        MoEDecoderLM(**TINY, moe=_moe())(torch.zeros(1, 33, dtype=torch.long))


def test_norm_head_fold_gives_same_logits() -> None:
    head = NormHead(16, 40)
    h = torch.randn(3, 16)
    torch.testing.assert_close(head.fold()(h), head(h))


def _count(model_name: str) -> tuple[int, int]:
    cfg = compose_config([f"model={model_name}"])
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="partial")
    c = count_parameters(model)
    return c.total, c.active


@pytest.mark.parametrize("name,total_b,active_b", [("ling_lite", 16.80, 2.75), ("ling_plus", 290.6, 29.0)])
def test_ling_presets_match_the_paper(name: str, total_b: float, active_b: float) -> None:
    total, active = _count(name)
    assert round(total / 1e9, 2 if total_b < 100 else 1) == total_b
    assert round(active / 1e9, 2 if active_b < 10 else 1) == active_b


def test_active_count_by_hand_and_flops() -> None:
    model = MoEDecoderLM(**TINY, moe=_moe(num_shared_experts=1))
    c = count_parameters(model)
    per_expert = 3 * 32 * 16
    assert c.total - c.active == 2 * (4 - 2) * per_expert  # two layers, two inactive experts each
    attn = 12 * 2 * 4 * 8 * 16  # layers * heads * head_dim * seq_len
    assert flops_per_token(model, 16) == 6 * (c.active - 64 * 32) + attn


def test_tied_weights_counted_once() -> None:
    tied = count_parameters(MoEDecoderLM(**TINY, tie_embeddings=True, moe=_moe()))
    untied = count_parameters(MoEDecoderLM(**TINY, moe=_moe()))
    assert untied.total - tied.total == 64 * 32
