"""Ling / Bailing-MoE v1 (BailingMoeForCausalLM, inclusionAI/Ling `models/modeling_bailing_moe.py`): the
family this plugin reimplements. Its modeling code is not part of transformers (it loads with
`trust_remote_code=True` from the model folder), so our export writes its published layout and config and
`auto_map`; put `configuration_bailing_moe.py` and `modeling_bailing_moe.py` from inclusionAI/Ling next to
the weights to load it with transformers.

Layout (read from the public modeling code): model.word_embeddings; per layer input_layernorm,
attention.query_key_value (q, k, v rows concatenated) and attention.dense (o), post_attention_layernorm,
mlp.gate.weight, mlp.experts.{e}.gate_proj/up_proj/down_proj, mlp.shared_experts.* (one SwiGLU of width
num_shared_experts * moe_intermediate_size, no gate); the first `first_k_dense_replace` layers have a dense
mlp of width intermediate_size. `norm_head=true` divides lm_head.weight by its L2 norm over dim 0 (+1e-7);
we import it as our NormHead and export it folded (norm_head=false).
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


class BailingMoe(Family):
    model_type = "bailing_moe"
    architecture = "BailingMoeForCausalLM"
    shared_expert = "shared_experts"
    attention = "attention"
    fused_qkv = "query_key_value"
    o_proj = "dense"
    embed = "model.word_embeddings.weight"
    in_transformers = False

    def config_to_ours(self, hf: dict[str, Any]) -> dict[str, Any]:
        require(
            not hf.get("use_bias", True), "bailing_moe", "use_bias=true (bias on attention.dense) is not supported."
        )
        require(not hf.get("use_sliding_window"), "bailing_moe", "sliding-window attention is not supported.")
        hf = {**hf, "num_key_value_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"]}
        out = common_to_ours(hf, "bailing_moe")
        k = int(hf.get("first_k_dense_replace", 0) or 0)
        shared = int(hf.get("num_shared_experts") or 0)
        out.update(
            attention_bias=bool(hf.get("use_qkv_bias", False)),
            norm_head=bool(hf.get("norm_head", False)),
            first_k_dense=k,
            dense_ffn_hidden_size=int(hf["intermediate_size"]) if k else None,
        )
        out["moe"] = inference_moe(
            {
                "num_experts": int(hf["num_experts"]),
                "top_k": int(hf["num_experts_per_tok"]),
                "expert_hidden_size": int(hf["moe_intermediate_size"]),
                "num_shared_experts": shared,
                "shared_expert_hidden_size": int(hf["moe_intermediate_size"]) if shared else None,
                "shared_expert_gate": False,
                "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
            }
        )
        return out

    def config_to_hf(self, ours: dict[str, Any]) -> dict[str, Any]:
        moe = moe_defaults(ours)
        check_plain_router(moe, "bailing_moe")
        require(not ours.get("qk_norm"), "bailing_moe", "has no q/k norm (model.qk_norm=false).")
        require(
            not moe["shared_expert_gate"],
            "bailing_moe",
            "has no shared-expert gate (model.moe.shared_expert_gate=false).",
        )
        n = int(moe["num_shared_experts"])
        E_width = int(moe["expert_hidden_size"])
        require(
            n == 0 or int(moe["shared_expert_hidden_size"] or E_width) == E_width,
            "bailing_moe",
            "shared experts have the routed experts' width (model.moe.shared_expert_hidden_size = expert_hidden_size).",
        )
        k = int(ours.get("first_k_dense", 0))
        return {
            **common_to_hf(ours, self),
            "auto_map": {
                "AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
                "AutoModel": "modeling_bailing_moe.BailingMoeModel",
                "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM",
            },
            "use_qkv_bias": bool(ours.get("attention_bias", False)),
            "use_bias": False,
            "norm_head": False,  # folded into lm_head.weight on export
            "embedding_dropout": 0.0,
            "output_dropout": 0.0,
            "rope_scaling": None,
            "num_experts": int(moe["num_experts"]),
            "num_shared_experts": n or None,
            "num_experts_per_tok": int(moe["top_k"]),
            "norm_topk_prob": bool(moe["norm_topk_prob"]),
            "moe_intermediate_size": E_width,
            "first_k_dense_replace": k,
            "intermediate_size": int(ours.get("dense_ffn_hidden_size") or E_width),
        }
