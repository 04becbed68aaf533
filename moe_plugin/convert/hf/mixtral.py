"""Mixtral (MixtralForCausalLM): GQA, no bias, softmax top-k renormalised, no shared experts.

Hub layout: model.layers.{i}.block_sparse_moe.gate.weight [E, D], .experts.{e}.w1/w3/w2.weight (gate/up/down).
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


class Mixtral(Family):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    moe_block = "block_sparse_moe"
    expert_weights = ("w1", "w3", "w2")

    def config_to_ours(self, hf: dict[str, Any]) -> dict[str, Any]:
        require(
            hf.get("sliding_window") is None, "mixtral", f"sliding_window={hf.get('sliding_window')} is not supported."
        )
        out = common_to_ours(hf, "mixtral")
        out["moe"] = inference_moe(
            {
                "num_experts": int(hf.get("num_local_experts", 8)),
                "top_k": int(hf.get("num_experts_per_tok", 2)),
                "expert_hidden_size": int(hf["intermediate_size"]),
                "num_shared_experts": 0,
                "norm_topk_prob": True,
                "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
                "router_jitter": float(hf.get("router_jitter_noise", 0.0) or 0.0),
            }
        )
        return out

    def config_to_hf(self, ours: dict[str, Any]) -> dict[str, Any]:
        moe = moe_defaults(ours)
        check_plain_router(moe, "mixtral")
        require(int(moe["num_shared_experts"]) == 0, "mixtral", "needs model.moe.num_shared_experts=0.")
        require(
            bool(moe["norm_topk_prob"]), "mixtral", "renormalises the top-k weights (model.moe.norm_topk_prob=true)."
        )
        require(not ours.get("qk_norm"), "mixtral", "has no q/k norm (model.qk_norm=false).")
        require(not ours.get("attention_bias"), "mixtral", "has no q/k/v bias (model.attention_bias=false).")
        require(int(ours.get("first_k_dense", 0)) == 0, "mixtral", "has no dense layers (model.first_k_dense=0).")
        return {
            **common_to_hf(ours, self),
            "num_local_experts": int(moe["num_experts"]),
            "num_experts_per_tok": int(moe["top_k"]),
            "intermediate_size": int(moe["expert_hidden_size"]),
            "sliding_window": None,
            "router_aux_loss_coef": float(moe.get("aux_loss_coef", 0.001)),
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
        }
