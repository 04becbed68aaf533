"""`moe-plugin inspect model=NAME [overrides] [--json]`: parameters and FLOPs per token of a model.

The model is built on the meta device: no memory is allocated, so even Ling-Plus (290B) takes seconds.
"""

from __future__ import annotations

import argparse
import json

import torch
from hydra.utils import instantiate

from moe_plugin.cli.compose import compose_config
from moe_plugin.config.validate import check_target_kwargs
from moe_plugin.models.inspect import attention_flops_per_token, count_parameters, flops_per_token

HELP = "Total and activated parameters and FLOPs per token of a model config (built on the meta device)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", default=[], help="Hydra overrides, e.g. model=ling_lite data.seq_len=4096"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="context for attention FLOPs (default: the configured data.seq_len, else model.max_seq_len)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_meta_model(overrides: list[str], seq_len: int | None = None) -> tuple[str, torch.nn.Module, int]:
    """(model group choice, the model built on the meta device, seq_len: given, else model.max_seq_len,
    else data.seq_len) - what `moe-plugin plan` and `cost` size for."""
    name, model, configured, max_len = _build(overrides, seq_len)
    return name, model, int(seq_len or max_len or configured)


def _build(overrides: list[str], seq_len: int | None) -> tuple[str, torch.nn.Module, int, int | None]:
    cfg = compose_config(overrides, return_hydra_config=True)
    name = cfg.hydra.runtime.choices.get("model")
    check_target_kwargs(cfg.model, "model")
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="partial")
    max_len = cfg.model.get("max_seq_len")
    data = cfg.get("data") or {}
    configured = seq_len or data.get("seq_len") or max_len
    if not configured:
        raise ValueError("no sequence length: set data.seq_len or model.max_seq_len, or pass --seq-len N.")
    return name, model, int(configured), int(max_len) if max_len else None


def inspect_model(overrides: list[str], seq_len: int | None = None, configured: bool = False) -> dict:
    """Parameters and FLOPs per token. Sequence length: `seq_len` if given, else the configured training
    length data.seq_len when `configured` (what `moe-plugin inspect` reports), else model.max_seq_len
    (what `moe-plugin cost` sizes for); FLOPs at max_seq_len are always reported beside it."""
    name, model, train_len, max_len = _build(overrides, seq_len)
    seq_len = seq_len or (train_len if configured else (max_len or train_len))
    counts = count_parameters(model)
    return {
        "model": name,
        "total_params": counts.total,
        "active_params": counts.active,
        "flops_per_token": flops_per_token(model, seq_len),
        "flops_per_token_no_attention": flops_per_token(model, seq_len, include_attention=False),
        "attention_flops_per_token": attention_flops_per_token(model, seq_len),
        "seq_len": seq_len,
        "max_seq_len": max_len,
        "flops_per_token_at_max_seq_len": flops_per_token(model, max_len) if max_len else None,
        "components": counts.components,
        "active_components": counts.active_components,
    }


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def run(args: argparse.Namespace) -> int:
    info = inspect_model(args.overrides, args.seq_len, configured=True)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model {info['model']}")
    print(f"  total params      {_fmt(info['total_params'])}  ({info['total_params']:,})")
    print(f"  activated params  {_fmt(info['active_params'])}  ({info['active_params']:,})")
    print(f"  FLOPs per token   {_fmt(info['flops_per_token'])}  (train fwd+bwd at seq_len {info['seq_len']})")
    if info["max_seq_len"] and info["max_seq_len"] != info["seq_len"]:
        at_max = info["flops_per_token_at_max_seq_len"]
        print(f"                    {_fmt(at_max)}  (at the model's max_seq_len {info['max_seq_len']})")
    print(f"  {'component':<16}{'total':>12}{'activated':>12}")
    for comp, n in sorted(info["components"].items(), key=lambda kv: -kv[1]):
        print(f"  {comp:<16}{_fmt(n):>12}{_fmt(info['active_components'][comp]):>12}")
    return 0
