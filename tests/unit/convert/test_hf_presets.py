"""Each family preset's structural flags match the family's transformers config (whose defaults are the
published flagship model's), mapped through our importer."""

from __future__ import annotations

from typing import Any

import pytest

from moe_plugin.cli.compose import compose_config
from moe_plugin.convert.hf import FAMILIES
from moe_plugin.convert.hf.deepseek_v3 import DeepseekV3

transformers = pytest.importorskip("transformers")

TOP = ("qk_norm", "attention_bias", "tie_embeddings", "norm_head")
MOE = ("norm_topk_prob", "shared_expert_gate", "score_func", "expert_bias")


def _flags(cfg: dict[str, Any]) -> dict[str, Any]:
    moe = {"num_shared_experts": 0, "shared_expert_gate": False, "score_func": "softmax", "expert_bias": False}
    moe.update(cfg.get("moe") or {})
    flags = {k: bool(cfg.get(k, False)) for k in TOP}
    flags["qk_norm_type"] = cfg.get("qk_norm_type", "head") if cfg.get("qk_norm") else None
    flags["dense_first"] = int(cfg.get("first_k_dense", 0) or 0) > 0
    flags["shared_experts"] = int(moe["num_shared_experts"]) > 0
    flags.update({k: moe.get(k) for k in MOE})
    return flags


@pytest.mark.parametrize(
    "preset,family,hf_config",
    [
        ("mixtral_tiny", "mixtral", lambda: transformers.MixtralConfig()),
        ("qwen_moe_tiny", "qwen2_moe", lambda: transformers.Qwen2MoeConfig()),
        # Qwen3-30B-A3B / 235B-A22B publish norm_topk_prob=true (the class default is false)
        ("qwen3_moe_tiny", "qwen3_moe", lambda: transformers.Qwen3MoeConfig(norm_topk_prob=True)),
        ("olmoe_tiny", "olmoe", lambda: transformers.OlmoeConfig()),
    ],
)
def test_preset_matches_family(preset: str, family: str, hf_config) -> None:
    ours = compose_config([f"model={preset}"]).model
    theirs = FAMILIES[family].config_to_ours(hf_config().to_dict())
    assert _flags(ours) == _flags(theirs)
    assert FAMILIES[family].supports(dict(ours)) is None  # and the preset exports to its family


def test_deepseek_preset_matches_moe_part() -> None:
    ours = compose_config(["model=deepseek_tiny"]).model
    theirs = DeepseekV3.moe_config(transformers.DeepseekV3Config().to_dict())
    mine, ref = _flags(ours), _flags({**theirs, "norm_head": False})
    for key in ("dense_first", "shared_experts", *MOE):
        assert mine[key] == ref[key], key
    assert ours.moe.num_expert_groups > 1 and ours.moe.routing_scale == theirs["moe"]["routing_scale"]
