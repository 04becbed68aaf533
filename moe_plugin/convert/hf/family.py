"""What every Hugging Face family mapping shares: the tensor plan of a layer and config helpers.

Our model's tensors (MoEDecoderLM.state_dict) and a family's Hub layout (the per-expert keys save_pretrained
writes, which transformers, vLLM and SGLang read) are put in correspondence by a *plan*: a list of `Entry`,
each pairing some of our keys with some Hugging Face keys and the two (pure, exact) transforms between them.
Shapes: E experts, D hidden, F expert FFN width; our experts are stacked [E, D, F] (w_down [E, F, D]), Hub
experts are one nn.Linear weight per expert ([F, D] for gate/up, [D, F] for down), so

    hf gate/up of expert e = ours[e].T        hf down of expert e = w_down_EFD[e].T
    ours = stack(hf_e.T for e in range(E))

Both directions only transpose, slice or concatenate: a round trip is bit-exact.
A family file (mixtral.py, qwen2_moe.py, ...) sets the names and the two config functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moe_plugin.convert.hf.io import HFFormatError

Tensors = list[torch.Tensor]
# Buffers of our model that hold training state only (routing-warmup statistics), not exported.
TRAINING_ONLY = (".router.warmup.",)


@dataclass
class Entry:
    ours: list[str]
    hf: list[str]
    to_hf: Callable[[Tensors], Tensors]
    to_ours: Callable[[Tensors], Tensors]


def _same(ts: Tensors) -> Tensors:
    return list(ts)


def _split_experts(ts: Tensors) -> Tensors:
    (w_EXY,) = ts
    return [w_EXY[e].T.contiguous() for e in range(w_EXY.shape[0])]


def _stack_experts(ts: Tensors) -> Tensors:
    return [torch.stack([w.T for w in ts]).contiguous()]


def direct(ours: str, hf: str) -> Entry:
    return Entry([ours], [hf], _same, _same)


class Family:
    """Hub names of one family. Subclasses set the class attributes and the two config functions."""

    model_type: str = ""
    architecture: str = ""
    moe_block: str = "mlp"  # module that holds router ("gate") and experts
    expert_weights: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared_expert: str | None = None  # "shared_expert" (Qwen2-MoE), "shared_experts" (DeepSeek, Ling)
    shared_expert_gate: str | None = None
    attention: str = "self_attn"
    fused_qkv: str | None = None  # one q/k/v projection (Ling's "query_key_value")
    o_proj: str = "o_proj"
    embed: str = "model.embed_tokens.weight"
    # transformers builds this family offline from a config (parity-tested against it)
    in_transformers: bool = True
    # a dense family (Llama, Qwen2): every block is a dense SwiGLU, moefy makes it an MoE
    dense: bool = False

    # ----------------------------------------------------------------------------------------- configs
    def config_to_ours(self, hf: dict[str, Any]) -> dict[str, Any]:
        """MoEDecoderLM keyword arguments from the family's config.json (raises HFFormatError if unsupported)."""
        raise NotImplementedError

    def config_to_hf(self, ours: dict[str, Any]) -> dict[str, Any]:
        """The family's config.json from MoEDecoderLM keyword arguments (raises HFFormatError if unsupported)."""
        raise NotImplementedError

    def supports(self, ours: dict[str, Any]) -> str | None:
        """None if a model with these arguments can be written in this family, else the reason it cannot."""
        try:
            self.config_to_hf(ours)
        except HFFormatError as err:
            return str(err)
        return None

    # -------------------------------------------------------------------------------------- tensor plan
    def global_plan(self, cfg: dict[str, Any]) -> list[Entry]:
        plan = [direct("embed_tokens.weight", self.embed), direct("norm.weight", "model.norm.weight")]
        if not cfg.get("tie_embeddings"):
            plan.append(direct("lm_head.weight", "lm_head.weight"))
        return plan

    def layer_plan(self, i: int, cfg: dict[str, Any]) -> list[Entry]:
        o, h = f"layers.{i}.", f"model.layers.{i}."
        a = f"{h}{self.attention}."
        plan = [
            direct(f"{o}attn_norm.weight", f"{h}input_layernorm.weight"),
            direct(f"{o}ffn_norm.weight", f"{h}post_attention_layernorm.weight"),
            direct(f"{o}attention.o_proj.weight", f"{a}{self.o_proj}.weight"),
        ]
        suffixes = ["weight", "bias"] if cfg.get("attention_bias") else ["weight"]
        for s in suffixes:
            ours = [f"{o}attention.{p}_proj.{s}" for p in "qkv"]
            if self.fused_qkv:
                # rows [q (H*Dh); k (G*Dh); v (G*Dh)], the order Ling's view(..., H + 2G, Dh).split uses
                sizes = _qkv_rows(cfg)
                plan.append(
                    Entry(
                        ours,
                        [f"{a}{self.fused_qkv}.{s}"],
                        lambda ts: [torch.cat(ts, dim=0)],
                        lambda ts, sizes=sizes: list(torch.split(ts[0], sizes, dim=0)),
                    )
                )
            else:
                plan += [direct(k, f"{a}{p}_proj.{s}") for k, p in zip(ours, "qkv")]
        if cfg.get("qk_norm"):
            plan += [direct(f"{o}attention.{n}.weight", f"{a}{n}.weight") for n in ("q_norm", "k_norm")]
        if i < cfg.get("first_k_dense", 0):
            plan += [direct(f"{o}ffn.{p}.weight", f"{h}mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
            return plan
        return plan + self.moe_plan(o + "ffn.", f"{h}{self.moe_block}.", cfg)

    def moe_plan(self, o: str, m: str, cfg: dict[str, Any]) -> list[Entry]:
        moe = cfg.get("moe") or {}
        E = int(moe.get("num_experts", 8))
        plan = [direct(f"{o}router.weight", f"{m}gate.weight")]
        if moe.get("expert_bias"):
            plan.append(direct(f"{o}router.expert_bias_E", f"{m}gate.e_score_correction_bias"))
        for ours, hf in zip(("w_gate_EDF", "w_up_EDF", "w_down_EFD"), self.expert_weights):
            plan.append(
                Entry(
                    [f"{o}experts.{ours}"],
                    [f"{m}experts.{e}.{hf}.weight" for e in range(E)],
                    _split_experts,
                    _stack_experts,
                )
            )
        if int(moe.get("num_shared_experts", 0)) > 0:
            if self.shared_expert is None:
                raise HFFormatError(f"{self.model_type} has no shared experts (model.moe.num_shared_experts > 0).")
            plan += [
                direct(f"{o}shared_experts.{p}.weight", f"{m}{self.shared_expert}.{p}.weight")
                for p in ("gate_proj", "up_proj", "down_proj")
            ]
            if moe.get("shared_expert_gate"):
                plan.append(direct(f"{o}shared_expert_gate.weight", f"{m}{self.shared_expert_gate}.weight"))
        return plan


def _qkv_rows(cfg: dict[str, Any]) -> list[int]:
    H = int(cfg["num_heads"])
    G = int(cfg.get("num_kv_heads") or H)
    Dh = int(cfg.get("head_dim") or cfg["hidden_size"] // H)
    return [H * Dh, G * Dh, G * Dh]


# ------------------------------------------------------------------------------------------ config helpers
def rope_theta_from(hf: dict[str, Any]) -> float:
    """RoPE base from either layout (transformers 5 `rope_parameters`, older `rope_theta` + `rope_scaling`)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise HFFormatError(
            f"RoPE scaling {rope_type!r} is not supported (our RoPE is the plain one); convert a checkpoint "
            "without rope_scaling, or remove it from config.json if the model was trained without it."
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def rope_to_hf(theta: float) -> dict[str, Any]:
    # both layouts: transformers 5 reads rope_parameters, transformers 4, vLLM and SGLang rope_theta
    return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}


def require(cond: bool, family: str, message: str) -> None:
    if not cond:
        raise HFFormatError(f"{family}: {message}")


def check_silu(hf: dict[str, Any], family: str) -> None:
    act = hf.get("hidden_act", "silu")
    require(act == "silu", family, f"hidden_act={act!r}; only SwiGLU with silu is supported.")


def common_to_ours(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The keys every Llama-like family spells the same way."""
    check_silu(hf, family)
    H = int(hf["num_attention_heads"])
    return {
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": int(hf["hidden_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": H,
        "num_kv_heads": int(hf.get("num_key_value_heads") or H),
        "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // H),
        "rope_theta": rope_theta_from(hf),
        "max_seq_len": int(hf.get("max_position_embeddings", 4096)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm_head": False,
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


def common_to_hf(ours: dict[str, Any], family: Family) -> dict[str, Any]:
    H = int(ours["num_heads"])
    out = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": int(ours["vocab_size"]),
        "hidden_size": int(ours["hidden_size"]),
        "num_hidden_layers": int(ours["num_layers"]),
        "num_attention_heads": H,
        "num_key_value_heads": int(ours.get("num_kv_heads") or H),
        "head_dim": int(ours.get("head_dim") or ours["hidden_size"] // H),
        "max_position_embeddings": int(ours.get("max_seq_len", 4096)),
        "rms_norm_eps": float(ours.get("norm_eps", 1e-6)),
        "tie_word_embeddings": bool(ours.get("tie_embeddings", False)),
        "initializer_range": float(ours.get("init_std", 0.02)),
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": "float32",
        # set from the tokenizer when one is exported with the model; a family's defaults may exceed our vocab
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **rope_to_hf(float(ours.get("rope_theta", 10000.0))),
    }
    return out


def moe_defaults(ours: dict[str, Any]) -> dict[str, Any]:
    """Our MoE arguments with the constructor's defaults filled in (what an exported model computes)."""
    moe = {
        "num_experts": 8,
        "top_k": 2,
        "expert_hidden_size": 512,
        "num_shared_experts": 0,
        "shared_expert_hidden_size": None,
        "shared_expert_gate": False,
        "norm_topk_prob": True,
        "score_func": "softmax",
        "routing_scale": 1.0,
        "num_expert_groups": 1,
        "topk_groups": 1,
        "expert_bias": False,
        "capacity_factor": None,
    }
    moe.update(ours.get("moe") or {})
    return moe


def check_plain_router(moe: dict[str, Any], family: str) -> None:
    """Softmax top-k without DeepSeek-V3's extras: what Mixtral, Qwen-MoE, OLMoE and Ling compute."""
    require(moe["score_func"] == "softmax", family, f"model.moe.score_func={moe['score_func']!r} needs 'softmax'.")
    require(float(moe["routing_scale"]) == 1.0, family, "model.moe.routing_scale must be 1.0.")
    require(
        int(moe["num_expert_groups"]) == 1, family, "model.moe.num_expert_groups must be 1 (no group-limited routing)."
    )
    require(not moe["expert_bias"], family, "model.moe.expert_bias must be false (no aux-loss-free bias).")
    require(moe.get("capacity_factor") is None, family, "model.moe.capacity_factor must be null (dropless routing).")


def inference_moe(moe: dict[str, Any]) -> dict[str, Any]:
    """Training-only settings of an imported model: no routing warmup (it would randomise a trained router)."""
    return {"routing_warmup": False, "router_jitter": 0.0, **moe}
