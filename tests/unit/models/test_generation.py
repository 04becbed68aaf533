"""Generation with a KV cache agrees with recomputing the whole sequence; attention options; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_plugin.cli.main import main
from moe_plugin.convert.hf.load import checkpoint_dict
from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.models.generation import generate, sample_next

MOE = {"num_experts": 4, "top_k": 2, "expert_hidden_size": 16, "num_shared_experts": 1, "routing_warmup": False}


def _model(**kw) -> MoEDecoderLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64, moe=MOE)
    return MoEDecoderLM(**{**cfg, **kw}).eval()


@pytest.mark.parametrize(
    "kw", [{}, {"qk_norm": True, "qk_norm_type": "full", "attention_bias": True}, {"qk_norm": True}]
)
def test_cached_logits_equal_full_recompute(kw) -> None:
    model = _model(**kw)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        parts = [model(ids[:, :4], cache=cache), model(ids[:, 4:7], cache=cache)]  # several positions at once
        parts += [model(ids[:, t : t + 1], cache=cache) for t in range(7, 10)]  # then one at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.seq_len == 10


def test_cached_and_uncached_generation_agree() -> None:
    model = _model()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    greedy = [generate(model, prompt, 20, temperature=0.0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1]) and greedy[0].shape == (2, 25)
    sampled = [
        generate(model, prompt, 20, temperature=1.0, top_k=8, use_cache=c, generator=torch.Generator().manual_seed(3))
        for c in (True, False)
    ]
    assert torch.equal(sampled[0], sampled[1])


def test_sampling_options() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert sample_next(logits, 0.0, None, None).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 2, g).item() for _ in range(50)}
    assert draws <= {1, 3} and len(draws) == 2  # top_k=2 keeps only the two best
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0, None, None)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(_model(), torch.zeros(1, 60, dtype=torch.long), 10)


def test_generate_cli(tmp_path: Path, capsys) -> None:
    torch.save(checkpoint_dict(_model()), tmp_path / "m.ckpt")
    ckpt = str(tmp_path / "m.ckpt")
    assert main(["generate", ckpt, "def ", "max_new_tokens=8", "temperature=0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_new_tokens"] == 8 and len(out["samples"]) == 1
    assert main(["generate", ckpt, "def ", "max_new_tokens=8", "temperature=0", "--json", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == out["samples"]
    with pytest.raises(SystemExit, match="not an option"):
        main(["generate", ckpt, "x", "bogus=1"])
    assert main(["generate", str(tmp_path / "missing.ckpt"), "x"]) == 2
