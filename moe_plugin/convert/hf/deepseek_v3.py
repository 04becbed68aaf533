"""DeepSeek-V3 (DeepseekV3ForCausalLM): refused, because its attention is Multi-head Latent Attention (MLA:
low-rank compressed q and kv, a decoupled RoPE part, interleaved rotary layout), which moe_plugin's attention
does not implement. Its MoE part is ours already (sigmoid scores, aux-loss-free expert bias, group-limited
top-k, routed scaling, shared experts, leading dense layers: `model=deepseek_tiny`); `moe_config` maps it, so
a test can hold our preset to the family's published flags.
"""

from __future__ import annotations

from typing import Any

from moe_plugin.convert.hf.family import Family, HFFormatError

MLA_MESSAGE = (
    "deepseek_v3 uses Multi-head Latent Attention (MLA), which moe_plugin's attention does not implement; "
    "DeepSeek-V3 checkpoints cannot be converted (train DeepSeek-style MoE layers with model=deepseek_tiny)."
)


class DeepseekV3(Family):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    shared_expert = "shared_experts"

    def config_to_ours(self, hf: dict[str, Any]) -> dict[str, Any]:
        raise HFFormatError(MLA_MESSAGE)

    def config_to_hf(self, ours: dict[str, Any]) -> dict[str, Any]:
        raise HFFormatError(MLA_MESSAGE)

    @staticmethod
    def moe_config(hf: dict[str, Any]) -> dict[str, Any]:
        """Our model.moe arguments and dense-layer count for the MoE part of a DeepSeek-V3 config."""
        return {
            "first_k_dense": int(hf.get("first_k_dense_replace", 0)),
            "moe": {
                "num_experts": int(hf["n_routed_experts"]),
                "top_k": int(hf["num_experts_per_tok"]),
                "expert_hidden_size": int(hf["moe_intermediate_size"]),
                "num_shared_experts": int(hf.get("n_shared_experts") or 0),
                "shared_expert_gate": False,
                "score_func": "sigmoid",
                "expert_bias": True,
                "routing_scale": float(hf.get("routed_scaling_factor", 1.0)),
                "num_expert_groups": int(hf.get("n_group", 1)),
                "topk_groups": int(hf.get("topk_group", 1)),
                "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
            },
        }
