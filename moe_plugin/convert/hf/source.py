"""Read any checkpoint the plugin writes, layer by layer, and rebuild its model.

A plain Lightning checkpoint file (single process, DDP, `moe-plugin ckpt consolidate`, `convert from-hf`) or an
expert-parallel directory (meta.pt + experts-ep*.pt at any EP size), read through
moe_plugin.parallel.checkpoint (`load_for_rank` assembles one layer's experts from the shards; files are
memory-mapped, so a layer at a time stays a layer at a time). The model config comes from the checkpoint
(`model_config`, saved by MoELanguageModule) or, for older files, from the run folder's .hydra/config.yaml.
Used by `convert to-hf`, `generate` and `train.py train=false test=true ckpt_path=...`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.parallel.checkpoint import is_sharded_checkpoint, read_dense_and_experts


class CheckpointConfigError(ValueError):
    """The checkpoint does not say which model it holds; the message says how to tell it."""


PREFIX = "model."  # MoELanguageModule keeps the decoder as `self.model`
EXPERT_WEIGHTS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


def load_file(path: str) -> dict[str, Any]:
    # memory-mapped: tensors are read from disk when touched, so a layer at a time stays a layer at a time
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


class CheckpointSource:
    """Our model's tensors (MoEDecoderLM keys), layer by layer, from a checkpoint file or EP directory."""

    def __init__(self, path: str | os.PathLike[str], model_config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"checkpoint {self.path} does not exist.")
        self.sharded = is_sharded_checkpoint(self.path)
        self._plain: dict[str, Any] | None = None
        self._sharded: tuple[dict[str, torch.Tensor], Any] | None = None
        meta = load_file(str(self.path / "meta.pt")) if self.sharded else self._plain_ckpt()
        self.meta = meta
        self.config = model_config or meta.get("model_config") or _config_from_run_folder(self.path)
        if self.config is None:
            raise CheckpointConfigError(
                f"{self.path} does not record the model's config (checkpoints written before moe_plugin saved "
                "`model_config`) and no .hydra/config.yaml was found above it: pass the model config, e.g. "
                "`moe-plugin convert to-hf CKPT OUT model=ling_tiny [model.key=value ...]`."
            )
        self.num_layers = int(self.config.get("num_layers", 4))

    def _plain_ckpt(self) -> dict[str, Any]:
        if self._plain is None:
            ckpt = load_file(str(self.path))
            if "state_dict" not in ckpt:
                raise CheckpointConfigError(f"{self.path} is not a Lightning checkpoint (no state_dict).")
            self._plain = ckpt
        return self._plain

    def _strip(self, state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}

    def _sharded_state(self) -> tuple[dict[str, torch.Tensor], Any]:
        """The directory's dense parameters (DCP folder of format 2 included) and its expert reader, read once."""
        if self._sharded is None:
            self._sharded = read_dense_and_experts(self.path, load_file)
        return self._sharded

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Every tensor of decoder layer i (experts assembled from the shards when sharded)."""
        prefix = f"layers.{i}."
        if not self.sharded:
            return {k: v for k, v in self._strip(self._plain_ckpt()["state_dict"]).items() if k.startswith(prefix)}
        dense, expert = self._sharded_state()
        out = {k: v for k, v in self._strip(dense).items() if k.startswith(prefix)}
        if i >= int(self.config.get("first_k_dense", 0)):
            for w in EXPERT_WEIGHTS:
                out[f"{prefix}ffn.experts.{w}"] = expert(f"{PREFIX}{prefix}ffn.experts.{w}")
        return out

    def globals(self) -> dict[str, torch.Tensor]:
        """Embeddings, final norm and LM head."""
        state = self._sharded_state()[0] if self.sharded else self._plain_ckpt()["state_dict"]
        return {k: v for k, v in self._strip(state).items() if not k.startswith("layers.")}


def _config_from_run_folder(path: Path) -> dict[str, Any] | None:
    """cfg.model of the Hydra run the checkpoint lives in (outputs/<task>/<time>/checkpoints/x.ckpt)."""
    from omegaconf import OmegaConf

    for parent in [path, *path.parents][:5]:
        cfg_file = parent / ".hydra" / "config.yaml"
        if cfg_file.is_file():
            model = OmegaConf.to_container(OmegaConf.load(cfg_file).model, resolve=False)
            assert isinstance(model, dict)
            if str(model.get("_target_", "")).endswith("MoEDecoderLM"):
                return {k: v for k, v in model.items() if not k.startswith("_")}
    return None


def run_tokenizer(path: Path) -> str | None:
    """The local HF tokenizer folder of the run the checkpoint belongs to, if any: data.tokenizer.path, or the
    Hugging Face model folder the run started from (model=from_hf, model.tokenizer=auto or a folder)."""
    from omegaconf import OmegaConf

    from moe_plugin.convert.hf.load import model_tokenizer_path

    for parent in [path, *path.parents][:5]:
        cfg_file = parent / ".hydra" / "config.yaml"
        if cfg_file.is_file():
            cfg = OmegaConf.load(cfg_file)
            tok = cfg.get("data", {}).get("tokenizer", {}) or {}
            p = tok.get("path") if hasattr(tok, "get") else None
            if p:
                return str(p)
            return model_tokenizer_path(cfg.get("model", {}) or {})
    return None


def load_model(path: str | os.PathLike[str], model_config: dict[str, Any] | None = None) -> MoEDecoderLM:
    """The checkpoint's model (MoEDecoderLM with its weights), in eval mode, from a file or an EP directory."""
    source = CheckpointSource(path, model_config)
    cfg = dict(source.config)
    cfg["moe"] = {**(cfg.get("moe") or {}), "routing_warmup": False}  # warmup statistics are training state
    model = MoEDecoderLM(**cfg)
    state = source.globals()
    for i in range(source.num_layers):
        state.update(source.layer(i))
    if cfg.get("tie_embeddings"):
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["embed_tokens.weight"]
    state = {k: v for k, v in state.items() if ".router.warmup." not in k}
    model.load_state_dict(state, strict=True)
    return model.eval()
