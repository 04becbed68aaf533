"""Hugging Face import/export: logits parity with transformers models built offline from tiny configs, bit-exact
round trips, export from plain and expert-parallel (sharded) checkpoints, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_plugin.convert.hf import FAMILIES, HFFormatError, family_for_model
from moe_plugin.convert.hf.export import export_checkpoint
from moe_plugin.convert.hf.io import HFWeights, ShardWriter
from moe_plugin.convert.hf.load import checkpoint_dict, from_pretrained, import_folder
from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.parallel.apply import expert_parameter_names
from moe_plugin.parallel.checkpoint import ShardedLayout, save_sharded

transformers = pytest.importorskip("transformers")

V = 96
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _hf_config(family: str):
    if family == "mixtral":
        return transformers.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":  # first layer dense (mlp_only_layers), gated shared expert, q/k/v bias
        return transformers.Qwen2MoeConfig(
            **COMMON,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            num_experts_per_tok=2,
            intermediate_size=48,
            mlp_only_layers=[0],
        )
    if family == "qwen3_moe":  # head_dim != hidden / heads
        return transformers.Qwen3MoeConfig(
            **COMMON, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, head_dim=16
        )
    return transformers.OlmoeConfig(
        **COMMON, intermediate_size=24, num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1
    )


def _init_by_hand_(model: torch.nn.Module) -> None:
    # transformers zero-initialises routers and biases; random values everywhere so every weight matters
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name else 0.0))


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def hf_folder(request, tmp_path_factory) -> tuple[str, Path, torch.Tensor]:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(request.param))
    _init_by_hand_(hf)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    with torch.no_grad():
        logits = hf.eval()(_ids()).logits
    return request.param, folder, logits


def _hf_logits(folder: Path) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return hf(_ids()).logits


def test_import_export_parity_and_round_trip(hf_folder, tmp_path: Path) -> None:
    family, folder, hf_logits = hf_folder
    ours = from_pretrained(str(folder)).eval()
    with torch.no_grad():
        our_logits = ours(_ids())
    assert (our_logits - hf_logits).abs().max() <= 1e-5, family

    ckpt = tmp_path / "ours.ckpt"
    summary = import_folder(folder, ckpt)
    assert summary["family"] == family
    out = tmp_path / "exported"
    info = export_checkpoint(ckpt, out)
    assert info["family"] == family and (out / "model.safetensors.index.json").is_file()
    assert (_hf_logits(out) - our_logits).abs().max() <= 1e-5

    # HF -> ours -> HF: every tensor bit-identical, same names
    a, b = HFWeights(folder), HFWeights(out)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k)), k
    # ours -> HF -> ours: the state dict bit-identical
    again = from_pretrained(str(out))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def _ling(**kw) -> MoEDecoderLM:
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=V,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        norm_head=True,
        moe={"num_experts": 4, "top_k": 2, "expert_hidden_size": 16, "num_shared_experts": 1, "routing_warmup": False},
    )
    cfg.update(kw)
    return MoEDecoderLM(**cfg).eval()


def test_ling_layout_round_trip_folds_norm_head(tmp_path: Path) -> None:
    """Ling's own layout (BailingMoe, remote code: not in transformers, so checked by round trip only)."""
    model = _ling()
    torch.save(checkpoint_dict(model), tmp_path / "ling.ckpt")
    info = export_checkpoint(tmp_path / "ling.ckpt", tmp_path / "hf")
    assert info["family"] == "bailing_moe" and not info["loads_in_transformers"]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["norm_head"] is False and cfg["architectures"] == ["BailingMoeForCausalLM"]
    keys = HFWeights(tmp_path / "hf").keys()
    assert "model.layers.0.attention.query_key_value.weight" in keys and "model.word_embeddings.weight" in keys
    back = from_pretrained(str(tmp_path / "hf")).eval()
    assert not back.init_kwargs["norm_head"]  # folded: a plain head with the normalised weight
    with torch.no_grad():
        assert (back(_ids()) - model(_ids())).abs().max() <= 1e-6


def test_export_from_expert_parallel_checkpoint(tmp_path: Path) -> None:
    """An EP=2 sharded directory (meta.pt + experts-ep*.pt, written by parallel/checkpoint.py's writer for each
    rank) exports layer by layer and loads in transformers with the model's logits."""
    model = MoEDecoderLM(
        vocab_size=V,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        moe={"num_experts": 4, "top_k": 2, "expert_hidden_size": 16, "routing_warmup": False},
    )
    torch.manual_seed(0)
    _init_by_hand_(model)
    model.eval()
    full = {**checkpoint_dict(model), "global_step": 7}
    ep, world = 2, 2
    names = {f"model.{n}": e for n, e in expert_parameter_names(model).items()}
    path = tmp_path / "step7.ckpt"
    for rank in range(world):
        j = rank % ep
        experts = {n: (e, j * e // ep, (j + 1) * e // ep) for n, e in names.items()}
        sd = {k: (v[experts[k][1] : experts[k][2]] if k in experts else v) for k, v in full["state_dict"].items()}
        save_sharded({**full, "state_dict": sd}, path, ShardedLayout(world, rank, ep, experts), [], torch.save)
    assert (path / "experts-ep001-of-002.pt").is_file()
    info = export_checkpoint(path, tmp_path / "hf", max_shard_bytes=40_000)
    assert info["family"] == "mixtral" and info["shards"] > 1  # several shards + index
    with torch.no_grad():
        assert (_hf_logits(tmp_path / "hf") - model(_ids())).abs().max() <= 1e-5


def test_shard_writer_splits_and_indexes(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, max_shard_bytes=100)
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each: 2 per shard
    for k, v in tensors.items():
        w.add(k, v)
    weight_map = w.close()
    assert len(set(weight_map.values())) == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200
    r = HFWeights(tmp_path)
    assert all(torch.equal(r.get(k), v) for k, v in tensors.items())


def test_refusals_are_clear(tmp_path: Path) -> None:
    with pytest.raises(HFFormatError, match="Multi-head Latent Attention"):
        FAMILIES["deepseek_v3"].config_to_ours(transformers.DeepseekV3Config().to_dict())
    deepseek_like = _ling(norm_head=False, moe={"num_experts": 4, "top_k": 2, "score_func": "sigmoid"}).init_kwargs
    with pytest.raises(HFFormatError, match="score_func"):
        family_for_model(deepseek_like)
    with pytest.raises(HFFormatError, match="qwen3_moe"):
        family_for_model(_ling().init_kwargs, "qwen3_moe")
    with pytest.raises(HFFormatError, match="config.json"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HFFormatError, match="model_type='gpt2'"):
        from_pretrained(str(tmp_path))
    with pytest.raises(HFFormatError, match="model.path"):
        from_pretrained(str(tmp_path / "missing"))


def test_convert_cli(tmp_path: Path, capsys) -> None:
    from moe_plugin.cli.main import main

    torch.save(checkpoint_dict(_ling(norm_head=False, moe={"num_experts": 4, "top_k": 2})), tmp_path / "m.ckpt")
    assert main(["convert", "to-hf", str(tmp_path / "m.ckpt"), str(tmp_path / "hf"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "mixtral"
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back.ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "mixtral"
    assert main(["convert", "to-hf", str(tmp_path / "m.ckpt"), str(tmp_path / "x"), "--family", "olmoe"]) == 2
    assert "qk_norm_type=full" in capsys.readouterr().out
    # a checkpoint without model_config: the config comes from overrides
    bare = {"state_dict": torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]}
    torch.save(bare, tmp_path / "bare.ckpt")
    assert main(["convert", "to-hf", str(tmp_path / "bare.ckpt"), str(tmp_path / "y")]) == 2
    assert "model_config" in capsys.readouterr().out
