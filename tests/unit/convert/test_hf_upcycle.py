"""A dense Hugging Face folder (Llama, Qwen2) imported and upcycled into an MoE: the same logits as the dense
transformers model, then exported as Mixtral and loaded back in transformers with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_plugin.convert.hf.export import export_checkpoint
from moe_plugin.convert.hf.load import checkpoint_dict, from_pretrained
from moe_plugin.layers.moe import MoE

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=80,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_dense_folder_upcycles_exactly(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**COMMON) if kind == "llama" else transformers.Qwen2Config(**COMMON)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name else 0.0))
    hf.save_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 80, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits = hf.eval()(ids).logits

    model = from_pretrained(str(tmp_path / "dense"), moefy={"num_experts": 4, "top_k": 2}).eval()
    assert all(isinstance(b.ffn, MoE) for b in model.layers)
    assert model.init_kwargs["moe"]["num_experts"] == 4 and model.init_kwargs["first_k_dense"] == 0
    with torch.no_grad():
        ours = model(ids)
    assert (ours - dense_logits).abs().max() <= 1e-5  # upcycling keeps the function

    torch.save(checkpoint_dict(model), tmp_path / "moe.ckpt")
    info = export_checkpoint(tmp_path / "moe.ckpt", tmp_path / "hf")
    if kind == "qwen2":  # q/k/v bias without a gated shared expert: only Ling's layout expresses it
        assert info["family"] == "bailing_moe"
        with torch.no_grad():
            assert torch.equal(from_pretrained(str(tmp_path / "hf")).eval()(ids), ours)
        return
    assert info["family"] == "mixtral"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (back(ids).logits - ours).abs().max() <= 1e-5


def test_dense_folder_needs_moefy(tmp_path: Path) -> None:
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**COMMON)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model.moefy"):
        from_pretrained(str(tmp_path))
