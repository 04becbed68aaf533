"""`moe-plugin convert from-hf HF_FOLDER OUT` and `moe-plugin convert to-hf CKPT OUT_FOLDER`.

from-hf: a local Hugging Face folder (mixtral, qwen2_moe, qwen3_moe, olmoe, bailing_moe; llama/mistral/qwen2
         with --moefy-experts to upcycle) -> our checkpoint file, for `generate`, evaluation or export.
to-hf:   any checkpoint the plugin writes (a file, or an expert-parallel directory) -> a Hugging Face folder
         (config.json, sharded safetensors + index, the run's tokenizer), streamed one layer at a time.
         Overrides (model=NAME model.key=value) give the model config for checkpoints that do not record it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "Hugging Face folders in and out: convert from-hf FOLDER OUT | to-hf CKPT OUT_FOLDER."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="convert_command", required=True)
    f = sub.add_parser("from-hf", help="a local Hugging Face folder -> our checkpoint file")
    f.add_argument("src", help="Hugging Face model folder (config.json + safetensors)")
    f.add_argument("dst", help="output checkpoint file, e.g. model.ckpt")
    f.add_argument("--moefy-experts", type=int, default=None, help="dense folder: upcycle into this many experts")
    f.add_argument("--moefy-top-k", type=int, default=2, help="dense folder: experts per token (default 2)")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    t = sub.add_parser("to-hf", help="our checkpoint (file or expert-parallel directory) -> Hugging Face folder")
    t.add_argument("src", help="checkpoint file or sharded checkpoint directory")
    t.add_argument("dst", help="output folder")
    t.add_argument(
        "overrides", nargs="*", default=[], help="model config when the checkpoint lacks it: model=NAME model.k=v"
    )
    t.add_argument("--family", default=None, help="mixtral, qwen2_moe, qwen3_moe, olmoe or bailing_moe (default: auto)")
    t.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16 (default: as saved)")
    t.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 500MB (default 2GB)")
    t.add_argument("--tokenizer", default=None, help="local HF tokenizer folder to include (default: the run's)")
    t.add_argument("--json", action="store_true", help="machine-readable output")


def parse_size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    t = text.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * scale)
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise SystemExit(f"moe-plugin convert: --max-shard-size={text!r} is not a size; use e.g. 500MB or 2GB.")


def _model_config(overrides: list[str]) -> dict[str, Any] | None:
    if not overrides:
        return None
    from omegaconf import OmegaConf

    from moe_plugin.cli.compose import compose_config

    model = OmegaConf.to_container(compose_config(overrides).model, resolve=True)
    assert isinstance(model, dict)
    return {k: v for k, v in model.items() if not k.startswith("_")}


def run(args: argparse.Namespace) -> int:
    from moe_plugin.convert.hf import HFFormatError
    from moe_plugin.convert.hf.source import CheckpointConfigError

    try:
        if args.convert_command == "from-hf":
            from moe_plugin.convert.hf.load import import_folder

            moefy = {"num_experts": args.moefy_experts, "top_k": args.moefy_top_k} if args.moefy_experts else None
            summary = import_folder(args.src, args.dst, moefy=moefy)
            text = f"wrote {summary['out']} ({summary['family']}, {summary['parameters']:,} parameters)"
        else:
            from moe_plugin.convert.hf.export import export_checkpoint

            summary = export_checkpoint(
                args.src,
                args.dst,
                family=args.family,
                dtype=args.dtype,
                max_shard_bytes=parse_size(args.max_shard_size),
                model_config=_model_config(args.overrides),
                tokenizer_path=args.tokenizer,
            )
            text = (
                f"wrote {summary['out']} as {summary['family']}: {summary['tensors']} tensors in "
                f"{summary['shards']} safetensors shard(s), {summary['bytes']:,} bytes"
                + (f", tokenizer {', '.join(summary['tokenizer'])}" if summary["tokenizer"] else ", no tokenizer")
            )
            if not summary["loads_in_transformers"]:
                text += (
                    "\nnote: BailingMoe is remote code; copy configuration_bailing_moe.py and modeling_bailing_moe.py "
                    "(inclusionAI/Ling, models/) into the folder and load with trust_remote_code=True."
                )
    except (HFFormatError, CheckpointConfigError, FileNotFoundError) as err:
        print(f"moe-plugin convert: {err}")
        return 2
    print(json.dumps(summary) if args.json else text)
    return 0
