"""Dense Llama-like folders (Llama, Mistral, Qwen2) for upcycling: imported as our decoder with every block a
dense SwiGLU (first_k_dense = num_layers), then `moefy` turns the blocks into MoE layers (see load.py).
Import only: a dense model is exported by its own library.
"""

from __future__ import annotations

from typing import Any

from moe_plugin.convert.hf.family import Family, HFFormatError, common_to_ours, require


class DenseLlama(Family):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    dense = True

    def config_to_ours(self, hf: dict[str, Any]) -> dict[str, Any]:
        family = hf.get("model_type", self.model_type)
        require(not hf.get("sliding_window") or family == "qwen2", family, "sliding-window attention is not supported.")
        require(not hf.get("use_sliding_window"), family, "sliding-window attention is not supported.")
        require(not hf.get("mlp_bias"), family, "mlp_bias=true is not supported.")
        out = common_to_ours(hf, family)
        if family == "qwen2":
            bias = True  # Qwen2 always biases q/k/v (never o)
        else:
            require(not hf.get("attention_bias"), family, "attention_bias=true also biases o_proj, not supported.")
            bias = False
        L = out["num_layers"]
        out.update(attention_bias=bias, first_k_dense=L, dense_ffn_hidden_size=int(hf["intermediate_size"]), moe={})
        return out

    def config_to_hf(self, ours: dict[str, Any]) -> dict[str, Any]:
        raise HFFormatError("dense families are import-only (for upcycling); export the MoE model instead.")
