"""Qwen2-MoE / Qwen1.5-MoE and Qwen3-MoE.

Qwen2-MoE: q/k/v bias, a shared expert behind a sigmoid gate (`shared_expert`, `shared_expert_gate`), top-k
weights not renormalised. Qwen3-MoE: RMSNorm per head on q and k, no bias, no shared expert. Both allow dense
layers (`mlp_only_layers`, `decoder_sparse_step`); we express those leading the stack (`first_k_dense`).
Hub layout: model.layers.{i}.mlp.gate.weight, .mlp.experts.{e}.gate_proj/up_proj/down_proj.weight.
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


def _dense_prefix(hf: dict[str, Any], family: str) -> int:
    """Number of leading dense layers, from mlp_only_layers and decoder_sparse_step (must be a prefix)."""
    L = int(hf["num_hidden_layers"])
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    only = set(hf.get("mlp_only_layers") or [])
    dense = [i for i in range(L) if i in only or (i + 1) % step != 0]
    require(
        dense == list(range(len(dense))),
        family,
        f"dense layers {dense} (mlp_only_layers / decoder_sparse_step) are not the first layers; moe_plugin "
        "supports leading dense layers only (model.first_k_dense).",
    )
    return len(dense)


def _sliding(hf: dict[str, Any], family: str) -> None:
    require(
        not hf.get("use_sliding_window") or hf.get("sliding_window") is None,
        family,
        "sliding-window attention (use_sliding_window=true) is not supported.",
    )


def _moe_to_hf(ours: dict[str, Any], moe: dict[str, Any]) -> dict[str, Any]:
    k = int(ours.get("first_k_dense", 0))
    out = {
        "num_experts": int(moe["num_experts"]),
        "num_experts_per_tok": int(moe["top_k"]),
        "moe_intermediate_size": int(moe["expert_hidden_size"]),
        "norm_topk_prob": bool(moe["norm_topk_prob"]),
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(k)),
        "use_sliding_window": False,
        "sliding_window": None,
        "router_aux_loss_coef": float(moe.get("aux_loss_coef", 0.001)),
        "output_router_logits": False,
        # width of the dense layers (there are none when first_k_dense=0; the field is required)
        "intermediate_size": int(ours.get("dense_ffn_hidden_size") or moe["expert_hidden_size"]),
    }
    return out


class Qwen2Moe(Family):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    shared_expert = "shared_expert"
    shared_expert_gate = "shared_expert_gate"

    def config_to_ours(self, hf: dict[str, Any]) -> dict[str, Any]:
        _sliding(hf, "qwen2_moe")
        out = common_to_ours(hf, "qwen2_moe")
        k = _dense_prefix(hf, "qwen2_moe")
        shared = int(hf.get("shared_expert_intermediate_size", 0) or 0)
        out.update(
            attention_bias=bool(hf.get("qkv_bias", True)),
            first_k_dense=k,
            dense_ffn_hidden_size=int(hf["intermediate_size"]) if k else None,
        )
        out["moe"] = inference_moe(
            {
                "num_experts": int(hf["num_experts"]),
                "top_k": int(hf["num_experts_per_tok"]),
                "expert_hidden_size": int(hf["moe_intermediate_size"]),
                "num_shared_experts": 1 if shared else 0,
                "shared_expert_hidden_size": shared or None,
                "shared_expert_gate": bool(shared),
                "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
                "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
            }
        )
        return out

    def config_to_hf(self, ours: dict[str, Any]) -> dict[str, Any]:
        moe = moe_defaults(ours)
        check_plain_router(moe, "qwen2_moe")
        n = int(moe["num_shared_experts"])
        require(
            n > 0 and bool(moe["shared_expert_gate"]),
            "qwen2_moe",
            "needs a gated shared expert (model.moe.num_shared_experts >= 1 and model.moe.shared_expert_gate=true).",
        )
        require(not ours.get("qk_norm"), "qwen2_moe", "has no q/k norm (model.qk_norm=false).")
        width = n * int(moe["shared_expert_hidden_size"] or moe["expert_hidden_size"])
        return {
            **common_to_hf(ours, self),
            **_moe_to_hf(ours, moe),
            "qkv_bias": bool(ours.get("attention_bias", False)),
            "shared_expert_intermediate_size": width,
        }


class Qwen3Moe(Family):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    def config_to_ours(self, hf: dict[str, Any]) -> dict[str, Any]:
        _sliding(hf, "qwen3_moe")
        require(
            not hf.get("attention_bias"), "qwen3_moe", "attention_bias=true also biases o_proj, which is not supported."
        )
        out = common_to_ours(hf, "qwen3_moe")
        k = _dense_prefix(hf, "qwen3_moe")
        out.update(
            qk_norm=True,
            qk_norm_type="head",
            first_k_dense=k,
            dense_ffn_hidden_size=int(hf["intermediate_size"]) if k else None,
        )
        out["moe"] = inference_moe(
            {
                "num_experts": int(hf.get("num_experts", hf.get("num_local_experts", 128))),
                "top_k": int(hf["num_experts_per_tok"]),
                "expert_hidden_size": int(hf["moe_intermediate_size"]),
                "num_shared_experts": 0,
                "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
                "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
            }
        )
        return out

    def config_to_hf(self, ours: dict[str, Any]) -> dict[str, Any]:
        moe = moe_defaults(ours)
        check_plain_router(moe, "qwen3_moe")
        require(
            int(moe["num_shared_experts"]) == 0, "qwen3_moe", "has no shared experts (model.moe.num_shared_experts=0)."
        )
        require(
            bool(ours.get("qk_norm")) and ours.get("qk_norm_type", "head") == "head",
            "qwen3_moe",
            "normalises q and k per head (model.qk_norm=true, model.qk_norm_type=head).",
        )
        require(not ours.get("attention_bias"), "qwen3_moe", "has no q/k/v bias (model.attention_bias=false).")
        return {**common_to_hf(ours, self), **_moe_to_hf(ours, moe), "attention_bias": False}
