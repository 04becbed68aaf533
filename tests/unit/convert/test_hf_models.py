"""moefy on Hugging Face transformers models built offline from a config (no download, weights by hand)."""

from __future__ import annotations

import pytest
import torch

from moe_plugin import MoE, collect_aux_losses, moefy

transformers = pytest.importorskip("transformers")


def _init_by_hand_(model: torch.nn.Module, seed: int = 0) -> None:
    # transformers leaves weights to its own init scheme; set every one explicitly so the test does not
    # depend on it, at a scale where the FFNs matter to the logits.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or ".ln_" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _llama(kind: str = "llama"):
    common = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if kind == "phi3":  # fused gate_up_proj
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, pad_token_id=0))
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.slow
def test_tiny_llama_upcycled_logits_equal_then_trains():
    torch.manual_seed(0)
    model = _llama("llama")
    _init_by_hand_(model)
    model.eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits

    moefy(model, num_experts=8, top_k=2, upcycle=True)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == 2 and all(isinstance(layer.mlp, MoE) for layer in model.model.layers)
    with torch.no_grad():
        upcycled = model(ids).logits
    diff = (upcycled - dense).abs().max().item()
    print(
        f"tiny Llama, 8 experts top-2 upcycled: max |logits diff| = {diff:.3g} (logits up to {dense.abs().max():.3g})"
    )
    torch.testing.assert_close(upcycled, dense, rtol=0, atol=1e-5)

    # Train a few steps: LM loss + our aux losses, every expert parameter receives gradient eventually.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(6):
        out = model(batch, labels=batch)
        aux = collect_aux_losses(model)
        assert aux is not None and torch.isfinite(aux)
        (out.loss + aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    w = moes[0].experts.w_up_EDF
    assert not torch.equal(w[0], w[1]), "experts should diverge once they see different tokens"


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "phi3", "gpt2"])
def test_other_hf_families_upcycle_exactly_with_fine_grained_experts(kind):
    torch.manual_seed(0)
    model = _llama(kind)
    _init_by_hand_(model)
    model.eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
    # GPT-2's MLP is 4 * 32 = 128 wide; the Llama-style ones 96. Granularity 2 fits both.
    moefy(model, num_experts=4, top_k=2, granularity=2, upcycle=True)
    assert sum(isinstance(m, MoE) for m in model.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=1e-5)
