"""Layer-level parity with Hugging Face transformers' own MoE blocks, built offline from small configs
with weights copied across: Mixtral, Qwen3-MoE, and Qwen2-MoE with its sigmoid-gated shared expert."""

from __future__ import annotations

import pytest
import torch

from moe_plugin.layers.moe import MoE

transformers = pytest.importorskip("transformers")

D, I, E, K = 32, 48, 8, 2  # noqa: E741


def _copy_experts(ours: MoE, hf_experts) -> None:
    with torch.no_grad():
        gate_up = hf_experts.gate_up_proj  # [E, 2I, D], gate rows first
        ours.experts.w_gate_EDF.copy_(gate_up[:, :I, :].transpose(1, 2))
        ours.experts.w_up_EDF.copy_(gate_up[:, I:, :].transpose(1, 2))
        ours.experts.w_down_EFD.copy_(hf_experts.down_proj.transpose(1, 2))  # HF down is [E, D, I]


def _init(module: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.3)


def _build(name: str, implementation: str):
    if name == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=D, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
        cfg._experts_implementation = implementation
        hf = MixtralSparseMoeBlock(cfg)
        ours = MoE(D, num_experts=E, top_k=K, expert_hidden_size=I, norm_topk_prob=True)
    elif name == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(
            hidden_size=D, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True
        )
        cfg._experts_implementation = implementation
        hf = Qwen3MoeSparseMoeBlock(cfg)
        ours = MoE(D, num_experts=E, top_k=K, expert_hidden_size=I, norm_topk_prob=True)
    else:
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        cfg = Qwen2MoeConfig(
            hidden_size=D,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=40,
            num_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=False,
        )
        cfg._experts_implementation = implementation
        hf = Qwen2MoeSparseMoeBlock(cfg)
        ours = MoE(
            D,
            num_experts=E,
            top_k=K,
            expert_hidden_size=I,
            norm_topk_prob=False,
            num_shared_experts=1,
            shared_expert_hidden_size=40,
            shared_expert_gate=True,
        )
    _init(hf)
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        if ours.shared_experts is not None:
            ours.shared_experts.load_state_dict(hf.shared_expert.state_dict())
            ours.shared_expert_gate.weight.copy_(hf.shared_expert_gate.weight)
    _copy_experts(ours, hf.experts)
    return hf, ours


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_outputs_and_gradients_match_transformers(name, implementation):
    hf, ours = _build(name, implementation)
    hf.eval()
    ours.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 9, D)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, y_ours = hf(x_hf), ours(x_ours)
    torch.testing.assert_close(y_ours, y_hf, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y_hf)
    y_hf.backward(g)
    y_ours.backward(g)
    torch.testing.assert_close(x_ours.grad, x_hf.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.router.weight.grad, hf.gate.weight.grad, atol=1e-5, rtol=1e-5)
    gu = hf.experts.gate_up_proj.grad
    torch.testing.assert_close(ours.experts.w_gate_EDF.grad, gu[:, :I, :].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.experts.w_up_EDF.grad, gu[:, I:, :].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ours.experts.w_down_EFD.grad, hf.experts.down_proj.grad.transpose(1, 2), atol=1e-5, rtol=1e-5
    )
    if name == "qwen2_moe":
        torch.testing.assert_close(
            ours.shared_expert_gate.weight.grad, hf.shared_expert_gate.weight.grad, atol=1e-5, rtol=1e-5
        )


def test_aux_loss_matches_transformers_load_balancing_loss_func():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    hf, ours = _build("mixtral", "eager")
    x = torch.randn(3, 7, D)
    ours(x)
    logits = hf.gate(x.view(-1, D))[0]
    expected = load_balancing_loss_func((logits,), num_experts=E, top_k=K)
    torch.testing.assert_close(K * ours.stats.losses["balance_loss"], expected.detach(), atol=1e-6, rtol=1e-5)
