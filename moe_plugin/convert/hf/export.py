"""Export: any checkpoint the plugin writes -> a Hugging Face folder (config.json, sharded safetensors + index,
tokenizer when the run used a Hugging Face one), streaming one decoder layer at a time.

Checkpoints read (through moe_plugin.parallel.checkpoint, never re-parsed here):
- a plain Lightning checkpoint file (single process, DDP, `moe-plugin ckpt consolidate` output, `convert from-hf`);
- an expert-parallel directory (meta.pt + experts-ep*.pt, at any EP size): `load_for_rank` assembles the
  experts of ONE layer at a time from the shards, with files memory-mapped, so the whole model never sits in
  memory.
The model's config comes from the checkpoint (`model_config`, saved by MoELanguageModule) or, for older
files, from the run folder's .hydra/config.yaml. NormHead is folded into a plain lm_head (same logits).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moe_plugin.convert.hf import family_for_model
from moe_plugin.convert.hf.family import TRAINING_ONLY, Family
from moe_plugin.convert.hf.io import HFFormatError, ShardWriter, copy_tokenizer, has_tokenizer, write_config
from moe_plugin.convert.hf.source import CheckpointSource, run_tokenizer
from moe_plugin.layers.norm_head import NormHead


def _layer_tensors(family: Family, cfg: dict[str, Any], plan_fn: Any, ours: dict[str, torch.Tensor]) -> Iterator:
    used = set()
    for entry in plan_fn:
        missing = [k for k in entry.ours if k not in ours]
        if missing:
            raise HFFormatError(f"the checkpoint has no {missing[0]} (model config and weights disagree).")
        used.update(entry.ours)
        yield from zip(entry.hf, entry.to_hf([ours[k] for k in entry.ours]))
    left = [k for k in ours if k not in used and not any(t in k for t in TRAINING_ONLY)]
    if left:
        raise HFFormatError(f"{family.model_type} has no place for {left[:5]}: this model cannot be exported to it.")


def export_checkpoint(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    family: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    model_config: dict[str, Any] | None = None,
    tokenizer_path: str | None = None,
) -> dict[str, Any]:
    """Write a Hugging Face folder from checkpoint `ckpt`; returns a summary (family, shards, tensors, bytes)."""
    source = CheckpointSource(ckpt, model_config)
    cfg = source.config
    fam = family_for_model(cfg, family)
    hf_config = fam.config_to_hf(cfg)
    cast = getattr(torch, dtype) if dtype else None
    if dtype:
        hf_config["dtype"] = dtype
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, max_shard_bytes)

    def put(name: str, t: torch.Tensor) -> None:
        writer.add(name, t.to(cast) if cast is not None and t.is_floating_point() else t)

    glob = source.globals()
    if cfg.get("norm_head"):
        glob["lm_head.weight"] = _fold_norm_head(glob["lm_head.weight"])
    if cfg.get("tie_embeddings"):
        glob.pop("lm_head.weight", None)
    for name, t in _layer_tensors(fam, cfg, fam.global_plan(cfg), glob):
        put(name, t)
    for i in range(source.num_layers):
        for name, t in _layer_tensors(fam, cfg, fam.layer_plan(i, cfg), source.layer(i)):
            put(name, t)
    weight_map = writer.close()

    tok = tokenizer_path or run_tokenizer(source.path) or (source.meta.get("hf_source") or {}).get("path")
    copied: list[str] = []
    if tok and has_tokenizer(tok):
        copied = copy_tokenizer(tok, out)
        hf_config.update(_special_tokens(tok))
    write_config(out, hf_config)
    return {
        "family": fam.model_type,
        "out": str(out),
        "tensors": len(weight_map),
        "shards": len(set(weight_map.values())),
        "bytes": writer.total_size,
        "tokenizer": copied,
        "loads_in_transformers": fam.in_transformers,
    }


@torch.no_grad()
def _fold_norm_head(weight_VD: torch.Tensor) -> torch.Tensor:
    """The NormHead's normalisation baked into a plain head weight (the same logits, see layers/norm_head.py)."""
    head = NormHead(weight_VD.shape[1], weight_VD.shape[0])
    head.weight = torch.nn.Parameter(weight_VD.detach().clone(), requires_grad=False)
    return head.fold().weight.detach()


def _special_tokens(tokenizer_path: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
