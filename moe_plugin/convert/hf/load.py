"""Import: a local Hugging Face folder -> our MoEDecoderLM with its weights (and, optionally, upcycled).

    model = from_pretrained("/models/olmoe-tiny")                       # an MoE family, weights as they are
    model = from_pretrained("/models/llama", moefy={"num_experts": 8, "top_k": 2})   # dense -> MoE, upcycled

Also the target of `conf/model/from_hf.yaml` (`python train.py model=from_hf model.path=/folder`): `moe`
overrides the MoE training settings (aux-loss coefficients, capacity...), other keyword arguments override
MoEDecoderLM arguments that do not change the weights' shapes (rope_theta, max_seq_len...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from moe_plugin.convert.hf import family_for_hf
from moe_plugin.convert.hf.family import Family
from moe_plugin.convert.hf.io import HFFormatError, HFWeights, read_config
from moe_plugin.models.decoder import MoEDecoderLM

# Hub tensors that are not weights of the model (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def model_config_from_hf(folder: str | os.PathLike[str]) -> tuple[Family, dict[str, Any]]:
    """(family, MoEDecoderLM keyword arguments) of a Hugging Face folder, from its config.json."""
    hf = read_config(folder)
    family = family_for_hf(hf)
    return family, family.config_to_ours(hf)


def state_dict_from_hf(folder: str | os.PathLike[str], family: Family, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our state dict (MoEDecoderLM keys) from the folder's safetensors, reading one tensor at a time."""
    weights = HFWeights(folder)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    plan = family.global_plan(cfg)
    for i in range(int(cfg["num_layers"])):
        plan += family.layer_plan(i, cfg)
    for entry in plan:
        tensors = entry.to_ours([weights.get(k) for k in entry.hf])
        out.update(zip(entry.ours, tensors))
        used.update(entry.hf)
    unused = [k for k in weights.keys() if k not in used and not k.endswith(IGNORED_SUFFIXES)]
    if cfg.get("tie_embeddings") and "lm_head.weight" in unused:
        unused.remove("lm_head.weight")  # a tied copy some writers keep
    if unused:
        raise HFFormatError(
            f"{folder}: {len(unused)} tensors are not used by the {family.model_type} mapping, e.g. {unused[:5]}; "
            "the folder's weights and config.json disagree, or the model has a part moe_plugin does not implement."
        )
    return out


def from_pretrained(
    path: str,
    moe: dict[str, Any] | None = None,
    moefy: dict[str, Any] | None = None,
    dtype: str = "float32",
    tokenizer: str | None = "auto",
    **overrides: Any,
) -> MoEDecoderLM:
    """MoEDecoderLM built from a local Hugging Face folder's config.json, with its weights.

    moe:      overrides of the MoE settings (training-only ones: aux_loss_coef, capacity_factor, ...).
    moefy:    for a dense folder (llama, mistral, qwen2): arguments of moe_plugin.moefy (num_experts, top_k,
              expert_hidden_size, num_shared_experts, skip_first, ...); upcycled from the dense weights.
    tokenizer: read by train.py, not here (see `model_tokenizer`): "auto" (the folder's, if it has one), "bytes",
              or a tokenizer folder.
    overrides: other MoEDecoderLM arguments (those that change no weight shape, e.g. max_seq_len).
    Built on the meta device (parameter counting), the weights are not read.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise HFFormatError(
            f"model.path={path!r} is not a folder. Point it at a local Hugging Face model folder (config.json + "
            "safetensors); nothing is downloaded at run time."
        )
    family, cfg = model_config_from_hf(folder)
    if family.dense and not moefy:
        raise HFFormatError(
            f"{folder} is a dense {family.model_type} model; set model.moefy (e.g. model.moefy.num_experts=8 "
            "model.moefy.top_k=2) to upcycle it into an MoE."
        )
    if moefy and not family.dense:
        raise HFFormatError(f"model.moefy is for dense folders; {folder} is already an MoE ({family.model_type}).")
    shape_keys = {"vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "first_k_dense"}
    bad = sorted(set(overrides) & shape_keys)
    if bad:
        raise HFFormatError(f"model.{bad[0]} comes from {folder}/config.json and cannot be overridden.")
    cfg.update(overrides)
    if moe:
        cfg["moe"] = {**cfg["moe"], **moe}
    model = MoEDecoderLM(**cfg)
    if torch.empty(0).device.type != "meta":
        model.load_state_dict(state_dict_from_hf(folder, family, cfg), strict=True)
    if moefy:
        model = _upcycle(model, dict(moefy))
    model.to(getattr(torch, dtype))
    model.hf_source = {"path": str(folder), "model_type": family.model_type}  # type: ignore[assignment]
    return model


def model_tokenizer_path(model_cfg: Any) -> str | None:
    """The tokenizer folder a model=from_hf config asks for: the model folder's own (model.tokenizer=auto, when
    it has one) or the folder given; None for bytes or any other model."""
    from moe_plugin.convert.hf.io import has_tokenizer

    if not str(model_cfg.get("_target_", "")).endswith("hf.load.from_pretrained"):
        return None
    choice = model_cfg.get("tokenizer", "auto")
    if choice in (None, "bytes"):
        return None
    path = str(model_cfg.get("path")) if choice == "auto" else str(choice)
    if choice == "auto" and not has_tokenizer(Path(path).expanduser()):
        return None
    return path


def model_tokenizer(model_cfg: Any) -> dict[str, Any]:
    """{"tokenizer": HFTokenizer} for train.py's data module when cfg.model asks for one (see above), else {}."""
    from moe_plugin.data.tokenizers import HFTokenizer

    path = model_tokenizer_path(model_cfg)
    return {"tokenizer": HFTokenizer(path)} if path else {}


def _upcycle(model: MoEDecoderLM, moefy_kwargs: dict[str, Any]) -> MoEDecoderLM:
    """Dense blocks -> MoE layers with moefy (upcycled), and init_kwargs rewritten to the equivalent MoE model."""
    from moe_plugin.convert.moefy import moefy

    moefy_kwargs.setdefault("upcycle", True)
    moefy_kwargs.setdefault("target", r"layers\.\d+\.ffn")
    moefy(model, **moefy_kwargs)
    moes = [(i, b.ffn) for i, b in enumerate(model.layers) if not hasattr(b.ffn, "gate_proj")]
    if not moes:
        raise HFFormatError("model.moefy converted no block; check model.moefy.target / skip_first.")
    first = moes[0][0]
    if [i for i, _ in moes] != list(range(first, model.num_layers)):
        raise HFFormatError(
            "model.moefy must convert every block after the first dense ones (no `every` > 1): our decoder and the "
            "export formats keep dense blocks first only."
        )
    m = moes[0][1]
    kw = model.init_kwargs
    kw["first_k_dense"] = first
    kw["dense_ffn_hidden_size"] = kw["dense_ffn_hidden_size"] if first else None
    shared = m.shared_experts
    kw["moe"] = {
        "num_experts": m.num_experts,
        "top_k": m.top_k,
        "expert_hidden_size": m.experts.ffn_hidden_size,
        "num_shared_experts": 1 if shared is not None else 0,
        "shared_expert_hidden_size": shared.gate_proj.out_features if shared is not None else None,
        "shared_expert_gate": m.shared_expert_gate is not None,
        "norm_topk_prob": m.router.norm_topk_prob,
        "aux_loss_coef": m.aux_loss_coef,
        "z_loss_coef": m.z_loss_coef,
        "score_func": m.score_func,
        "routing_scale": m.router.routing_scale,
        "routing_warmup": False,
    }
    return model


def checkpoint_dict(model: MoEDecoderLM) -> dict[str, Any]:
    """A weights-only Lightning-style checkpoint of `model`: what `convert from-hf` writes, and what `convert
    to-hf`, `generate` and `train.py train=false test=true ckpt_path=...` read."""
    import lightning

    return {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "model_config": model.init_kwargs,
        "hf_source": getattr(model, "hf_source", None),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }


def import_folder(folder: str | os.PathLike[str], out: str | os.PathLike[str], **kwargs: Any) -> dict[str, Any]:
    """`moe-plugin convert from-hf FOLDER OUT`: write the folder's model as our checkpoint file; returns a summary."""
    model = from_pretrained(str(folder), **kwargs)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint_dict(model), str(out))
    return {
        "family": model.hf_source["model_type"],  # type: ignore[index]
        "out": str(out),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": Path(out).stat().st_size,
    }
