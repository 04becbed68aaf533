"""`moe-plugin ckpt inspect PATH [--json]` and `moe-plugin ckpt consolidate PATH OUT`.

inspect:     layout (EP, world size, experts per layer, shard files), step, epoch, data position and
             validity (checksums, missing shards) of a sharded directory or a plain checkpoint file.
             Reads meta.pt only. A truncated, empty or unreadable checkpoint is reported (valid False, the
             reason, exit status 1), not a crash: diagnosing those is what the command is for.
consolidate: a sharded expert-parallel checkpoint directory -> one plain Lightning checkpoint file
             with every expert and the full optimizer state, for a single device, export, or plain
             Lightning training (`ckpt_path=OUT` with any strategy). A local_sgd checkpoint gives island 0's
             model and optimizer; its outer state (`_local_sgd.*`) is dropped (docs/islands.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from moe_plugin.errors import USER_ERROR_EXIT, CheckpointError, UnsafeCheckpointError
from moe_plugin.lightning.checkpoint_io import check_checkpoint, load_weights_only
from moe_plugin.lightning.strategies.local_sgd_checkpoint import drop_outer_state
from moe_plugin.parallel.checkpoint import CheckpointFormatError, consolidate, describe

HELP = "Inspect or consolidate checkpoints (sharded expert-parallel directories or plain files)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ckpt_command", required=True)
    p = sub.add_parser("inspect", help="layout, step, data position and validity of a checkpoint")
    p.add_argument("path", help="checkpoint directory (sharded) or file (plain)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    c = sub.add_parser("consolidate", help="sharded directory -> one plain checkpoint file")
    c.add_argument("path", help="sharded checkpoint directory")
    c.add_argument("out", help="output file, e.g. model.ckpt")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    v = sub.add_parser(
        "convert",
        help="DeepSpeed directory (strategy=deepspeed_ep) -> one layout-free file, or back with --world-size",
    )
    v.add_argument("path", help="DeepSpeed directory (strategy.checkpoint_format=deepspeed) or layout-free checkpoint")
    v.add_argument("out", help="output: a layout-free file (from DeepSpeed) or a DeepSpeed directory (--world-size)")
    v.add_argument("--world-size", type=int, default=None, help="to DeepSpeed: trainer.devices x nodes of the target")
    v.add_argument("--expert-parallel-size", type=int, default=1, help="to DeepSpeed: strategy.expert_parallel_size")
    v.add_argument("--stage", type=int, default=2, help="to DeepSpeed: strategy.stage (ZeRO 1 or 2)")
    v.add_argument("--json", action="store_true", help="machine-readable output")


def _load(path: str) -> dict[str, Any]:
    """Every read is weights_only (a checkpoint cannot run code); errors name the file."""
    obj = load_weights_only(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a Lightning checkpoint dict.")
    return obj


def _validity(path: Path) -> dict[str, Any]:
    """Checksums and completeness (the same checker resume=auto uses)."""
    check = check_checkpoint(path)
    return {"valid": bool(check.valid), "reason": str(check.reason)}


def _unreadable(path: Path, err: CheckpointError, as_json: bool) -> int:
    """Report a checkpoint whose contents cannot be read (truncated, empty, not a checkpoint): status 1."""
    info = {"path": str(path), "kind": "sharded" if path.is_dir() else "plain", **_validity(path)}
    info["valid"] = False
    if info["reason"].startswith(("checksum ok", "size ok", "plain file", "meta.pt and")):
        info["reason"] = str(err)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(f"checkpoint      {info['path']}  ({info['kind']})")
        print(f"valid           False  ({info['reason']})")
    return 1


def _inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        print(f"moe-plugin ckpt inspect: {path} does not exist.", file=sys.stderr)
        return USER_ERROR_EXIT
    try:
        info = describe(path, _load)
    except UnsafeCheckpointError as err:
        print(f"moe-plugin ckpt inspect: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    except CheckpointError as err:
        return _unreadable(path, err, args.json)
    info.update(_validity(path))
    if info.get("missing_files"):
        info["valid"] = False
        info["reason"] = f"missing shard files: {info['missing_files']}"
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0 if info.get("valid") is not False else 1
    print(f"checkpoint      {info['path']}  ({info['kind']})")
    print(f"step / epoch    {info['global_step']} / {info['epoch']}   data position {info['data_position']}")
    if info.get("corpus"):
        c = info["corpus"]
        print(f"corpus          {c.get('documents')} documents, {c.get('bytes'):,} bytes, split by {c.get('split')}")
    print(f"dense           {info['dense_tensors']} tensors, {info['dense_parameters']:,} values")
    print(f"optimizers      {info['optimizers']}   lr schedulers {info['lr_schedulers']}")
    if info["kind"] == "sharded":
        print(f"layout          EP={info['expert_parallel_size']} on world size {info['world_size']}")
        per_layer = sorted(set(info["num_experts"].values()))
        print(f"experts         {len(info['num_experts'])} MoE layers, {per_layer} experts per layer")
        print(f"shards          {', '.join(info['shard_files'])}")
    print(f"valid           {info['valid']}  ({info['reason']})")
    return 0 if info.get("valid") is not False else 1


def _consolidate(args: argparse.Namespace) -> int:
    try:
        full = consolidate(args.path, _load)
    except (CheckpointFormatError, CheckpointError) as err:
        print(f"moe-plugin ckpt consolidate: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    full, dropped = drop_outer_state(full)  # local_sgd's outer state would break a strict load elsewhere
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(full, out)
    summary = {"out": str(out), "bytes": out.stat().st_size, "global_step": full.get("global_step")}
    if dropped:
        summary["dropped_local_sgd_outer_entries"] = dropped
    print(
        json.dumps(summary) if args.json else f"wrote {out} ({summary['bytes']:,} bytes, step {summary['global_step']})"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.ckpt_command == "convert":
        from moe_plugin.convert.deepspeed_checkpoint import convert_command

        return convert_command(args.path, args.out, args.json, args.world_size, args.expert_parallel_size, args.stage)
    return _inspect(args) if args.ckpt_command == "inspect" else _consolidate(args)
