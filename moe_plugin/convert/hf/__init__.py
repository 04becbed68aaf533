"""Hugging Face folders in and out: one file per family mapping, shared io and plan.

    from_pretrained(folder)            -> MoEDecoderLM with the folder's weights (load.py)
    export_checkpoint(ckpt, folder)    -> a Hugging Face folder from any checkpoint we write (export.py)

Families: mixtral, qwen2_moe, qwen3_moe, olmoe, bailing_moe (Ling) both ways; llama, mistral, qwen2 (dense)
in, for upcycling; deepseek_v3 refused (MLA attention).
"""

from __future__ import annotations

from typing import Any

from moe_plugin.convert.hf.bailing_moe import BailingMoe
from moe_plugin.convert.hf.deepseek_v3 import DeepseekV3
from moe_plugin.convert.hf.dense import DenseLlama
from moe_plugin.convert.hf.family import Family
from moe_plugin.convert.hf.io import HFFormatError
from moe_plugin.convert.hf.mixtral import Mixtral
from moe_plugin.convert.hf.olmoe import Olmoe
from moe_plugin.convert.hf.qwen import Qwen2Moe, Qwen3Moe

FAMILIES: dict[str, Family] = {
    "mixtral": Mixtral(),
    "qwen2_moe": Qwen2Moe(),
    "qwen3_moe": Qwen3Moe(),
    "olmoe": Olmoe(),
    "bailing_moe": BailingMoe(),
    "deepseek_v3": DeepseekV3(),
    "llama": DenseLlama(),
    "mistral": DenseLlama(),
    "qwen2": DenseLlama(),
}
# tried in this order when `to-hf` is not told the family: the first that can express the model wins
EXPORT_ORDER = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "bailing_moe")


def family_for_hf(hf_config: dict[str, Any]) -> Family:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise HFFormatError(
            f"model_type={model_type!r} is not supported; moe_plugin converts {sorted(FAMILIES)} "
            "(deepseek_v3 is refused: MLA attention)."
        )
    return FAMILIES[model_type]


def family_for_model(model_config: dict[str, Any], name: str | None = None) -> Family:
    """The family to export a model with these MoEDecoderLM arguments to (`name`, or the first that fits)."""
    if name is not None:
        if name not in EXPORT_ORDER and name != "deepseek_v3":
            raise HFFormatError(f"--family={name!r} must be one of {EXPORT_ORDER}.")
        reason = FAMILIES[name].supports(model_config)
        if reason:
            raise HFFormatError(f"this model cannot be written as {name}: {reason}")
        return FAMILIES[name]
    reasons = {}
    for n in EXPORT_ORDER:
        reason = FAMILIES[n].supports(model_config)
        if reason is None:
            return FAMILIES[n]
        reasons[n] = reason
    lines = "\n".join(f"  {n}: {r}" for n, r in reasons.items())
    raise HFFormatError(f"no Hugging Face family can express this model:\n{lines}")


__all__ = ["EXPORT_ORDER", "FAMILIES", "Family", "HFFormatError", "family_for_hf", "family_for_model"]
