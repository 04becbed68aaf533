"""OLMoE (OlmoeForCausalLM): RMSNorm over the whole q and k projections (before the head split), no shared
experts, top-k weights not renormalised, untied embeddings.

Hub layout: model.layers.{i}.self_attn.q_norm.weight [H*Dh], k_norm.weight [G*Dh], mlp.gate.weight,
mlp.experts.{e}.gate_proj/up_proj/down_proj.weight.
"""

from __future__ import annotations

from typing import Any

from moe_plugin.convert.hf.family import (
    Family,
    check_plain_router,
    common_to_hf,
    common_to_ours,
    inference_moe,
    moe_defaults,
    require,
)


class Olmoe(Family):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"

    def config_to_ours(self, hf: dict[str, Any]) -> dict[str, Any]:
        require(hf.get("clip_qkv") is None, "olmoe", f"clip_qkv={hf.get('clip_qkv')} is not supported.")
        require(
            not hf.get("attention_bias"), "olmoe", "attention_bias=true also biases o_proj, which is not supported."
        )
        out = common_to_ours(hf, "olmoe")
        out.update(qk_norm=True, qk_norm_type="full")
        out["moe"] = inference_moe(
            {
                "num_experts": int(hf["num_experts"]),
                "top_k": int(hf["num_experts_per_tok"]),
                "expert_hidden_size": int(hf["intermediate_size"]),
                "num_shared_experts": 0,
                "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
                "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.01)),
            }
        )
        return out

    def config_to_hf(self, ours: dict[str, Any]) -> dict[str, Any]:
        moe = moe_defaults(ours)
        check_plain_router(moe, "olmoe")
        require(int(moe["num_shared_experts"]) == 0, "olmoe", "has no shared experts (model.moe.num_shared_experts=0).")
        require(
            bool(ours.get("qk_norm")) and ours.get("qk_norm_type") == "full",
            "olmoe",
            "normalises the whole q and k projections (model.qk_norm=true, model.qk_norm_type=full).",
        )
        require(not ours.get("attention_bias"), "olmoe", "has no q/k/v bias (model.attention_bias=false).")
        require(int(ours.get("first_k_dense", 0)) == 0, "olmoe", "has no dense layers (model.first_k_dense=0).")
        return {
            **common_to_hf(ours, self),
            "num_experts": int(moe["num_experts"]),
            "num_experts_per_tok": int(moe["top_k"]),
            "intermediate_size": int(moe["expert_hidden_size"]),
            "norm_topk_prob": bool(moe["norm_topk_prob"]),
            "attention_bias": False,
            "clip_qkv": None,
            "router_aux_loss_coef": float(moe.get("aux_loss_coef", 0.01)),
            "output_router_logits": False,
        }
