"""DeepSpeed checkpoint directories of the deepspeed_ep strategy <-> the plugin's layout-free checkpoint.

    moe-plugin ckpt convert DS_DIR OUT.ckpt                          DeepSpeed -> one layout-free file
    moe-plugin ckpt convert CKPT DS_DIR --world-size 2 --expert-parallel-size 2 --stage 2
                                                                     layout-free -> DeepSpeed (written by
                                                                     DeepSpeed's engine: parallel/deepspeed_export.py)

Vocabulary: W world size and EP expert-parallel size of the run that saved, E global experts of a layer,
L = E / EP local experts, j an expert-group rank (0..EP-1).

A DeepSpeed checkpoint (strategy.checkpoint_format=deepspeed, written by DeepSpeed's engine.save_checkpoint) is

    P/latest                                         the tag of the save ("checkpoint" under Lightning)
    P/<tag>/mp_rank_00_model_states.pt               rank 0: dense module weights, `param_shapes`, and the
                                                     client state = Lightning's checkpoint dict without weights,
                                                     plus our record "moe_plugin_deepspeed" (layout, names)
    P/<tag>/*zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                                                     rank r's ZeRO-1/2 partitions: per optimizer group, the fp32
                                                     master partition, the optimizer state partition, and
                                                     `param_slice_mappings` {name: (start, numel)} locating each
                                                     parameter fragment inside the partition

A group's flat buffer is the concatenation of its parameters, split evenly over the group's ranks in rank
order: all W ranks for dense groups, the expert-data-parallel group {i*EP + j} of expert-group rank j for MoE
groups (so an expert name has one value per j: that rank's local experts [L, ...]). A parameter is therefore
the concatenation of its fragments over those ranks in order. Expert slices j = 0..EP-1 are concatenated
into the global [E, ...] tensor (experts by global id), which is what `to_plain_checkpoint` returns: a plain
Lightning checkpoint dict (every expert, torch-optimizer state keyed by the ids of the optimizer
configure_optimizers builds), loadable at any EP/world size by expert_parallel, deepspeed_ep and plain Lightning.

ZeRO-3 saves are not read here (their partitions follow a different layout): at ZeRO-3 keep the default
checkpoint_format=moe_plugin.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moe_plugin.parallel.deepspeed_groups import regroup_scheduler_state

RECORD_KEY = "moe_plugin_deepspeed"
# keys DeepSpeed adds to its model-states file around the client state (engine._save_checkpoint)
DEEPSPEED_KEYS = {
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "ds_config",
    "ds_version",
    "num_experts",
    "ds_autoep_layers",
    "universal_checkpoint_info",
    "checkpoint_parallel_dimensions",
    RECORD_KEY,
}


class DeepSpeedCheckpointError(ValueError):
    """A DeepSpeed checkpoint this converter cannot read; the message says why and what to do."""


def deepspeed_tag_dir(path: str | os.PathLike[str]) -> Path | None:
    """The folder holding a DeepSpeed save (P/<latest tag>), or None when `path` is not a DeepSpeed checkpoint."""
    p = Path(path)
    if not p.is_dir():
        return None
    latest = p / "latest"
    candidates = [p / latest.read_text().strip()] if latest.is_file() else []
    candidates.append(p)
    for c in candidates:
        if c.is_dir() and any(c.glob("*model_states.pt")):
            return c
    return None


def is_deepspeed_checkpoint(path: str | os.PathLike[str]) -> bool:
    return deepspeed_tag_dir(path) is not None


def _rank_files(tag: Path) -> dict[int, Path]:
    files = {}
    for f in tag.glob("*zero_pp_rank_*_optim_states.pt"):
        m = re.search(r"zero_pp_rank_(\d+)_", f.name)
        if m:
            files[int(m.group(1))] = f
    return files


def _group_state(osd: dict[str, Any], i: int) -> dict[str, Any]:
    """Optimizer state of flat group i (elastic: a list per group; else the base optimizer's state_dict)."""
    base = osd["base_optimizer_state"]
    if isinstance(base, list):
        return base[i]
    return base["state"].get(i, {})


def load_deepspeed_file(path: str) -> dict[str, Any]:
    """torch.load(weights_only=True) of a DeepSpeed checkpoint file: besides tensors and plain data DeepSpeed
    stores only its loss scaler, ZeRO stage enum and fragment addresses, which are allow-listed (no code runs)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from moe_plugin.lightning.checkpoint_io import load_weights_only

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return load_weights_only(path, mmap=False)


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """deepspeed_ep's layout record of a DeepSpeed directory (None when absent); reads the model-states file."""
    tag = deepspeed_tag_dir(path)
    if tag is None:
        return None
    return load_deepspeed_file(str(sorted(tag.glob("*model_states.pt"))[0])).get(RECORD_KEY)


def to_plain_checkpoint(
    path: str | os.PathLike[str], load_file: Callable[[str], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A deepspeed_ep DeepSpeed checkpoint directory -> one plain Lightning checkpoint dict (see module docstring)."""
    load = load_file or load_deepspeed_file
    tag = deepspeed_tag_dir(path)
    if tag is None:
        raise DeepSpeedCheckpointError(f"{path} is not a DeepSpeed checkpoint directory (no *model_states.pt).")
    model_files = sorted(tag.glob("*model_states.pt"))
    states = load(str(model_files[0]))
    record = states.get(RECORD_KEY)
    if record is None:
        raise DeepSpeedCheckpointError(
            f"{path} has no '{RECORD_KEY}' record: it was not written by strategy=deepspeed_ep (which stores the "
            "expert layout and parameter names there). Only deepspeed_ep's DeepSpeed checkpoints can be converted."
        )
    if record["zero_stage"] not in (1, 2):
        raise DeepSpeedCheckpointError(
            f"{path} was saved at ZeRO-{record['zero_stage']}; only ZeRO-1/2 DeepSpeed directories are converted. "
            "Save with strategy.checkpoint_format=moe_plugin (layout-free already) at ZeRO-3."
        )
    world, ep = record["world_size"], record["expert_parallel_size"]
    files = _rank_files(tag)
    if sorted(files) != list(range(world)):
        raise DeepSpeedCheckpointError(f"{tag} holds ZeRO files of ranks {sorted(files)}, expected 0..{world - 1}.")
    experts: dict[str, int] = record["expert_params"]
    # (name, j or None) -> fragments in rank order; j is the expert-group rank for expert parameters
    weight_parts: dict[tuple[str, int | None], list[torch.Tensor]] = {}
    state_parts: dict[tuple[str, int | None], dict[str, list[torch.Tensor]]] = {}
    step: float | None = None
    for r in range(world):
        osd = load(str(files[r]))["optimizer_state_dict"]
        for i, (partition, mapping) in enumerate(
            zip(osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"])
        ):
            gstate = _group_state(osd, i)
            if step is None and "step" in gstate:
                step = float(gstate["step"])
            for name, addr in mapping.items():
                key = (name, r % ep if name in experts else None)
                start, numel = int(addr.start), int(addr.numel)
                weight_parts.setdefault(key, []).append(partition.narrow(0, start, numel))
                for k, v in gstate.items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        state_parts.setdefault(key, {}).setdefault(k, []).append(v.narrow(0, start, numel))
    shapes = {n: s for group in states["param_shapes"] for n, s in group.items()}

    def full(parts: list[torch.Tensor], name: str) -> torch.Tensor:
        flat = torch.cat(parts)
        shape = torch.Size(shapes[name])
        if flat.numel() != shape.numel():
            raise DeepSpeedCheckpointError(
                f"{name}: fragments hold {flat.numel()} values, the parameter {shape.numel()}."
            )
        return flat.view(shape).clone()

    def assemble(name: str, parts_of: Callable[[tuple[str, int | None]], list[torch.Tensor]]) -> torch.Tensor:
        if name not in experts:
            return full(parts_of((name, None)), name)
        return torch.cat([full(parts_of((name, j)), name) for j in range(ep)], dim=0)  # experts by global id

    names = [n for group in record["original_names"] for n in group]
    state_dict = dict(states["module"])  # dense weights and buffers (experts are not in DeepSpeed's module file)
    for n in names:
        state_dict[n] = assemble(n, lambda k: weight_parts[k])
    keys = sorted({k for d in state_parts.values() for k in d})
    opt_state: dict[int, dict[str, Any]] = {}
    if step is not None:
        for idx, n in enumerate(names):
            opt_state[idx] = {"step": torch.tensor(step)}
            for k in keys:
                opt_state[idx][k] = assemble(n, lambda key, k=k: state_parts[key][k])
    index = {n: i for i, n in enumerate(names)}
    groups = [
        {**h, "params": [index[n] for n in g]}
        for h, g in zip(record["original_hyperparameters"], record["original_names"])
    ]
    out = {k: v for k, v in states.items() if k not in DEEPSPEED_KEYS}
    out["state_dict"] = state_dict
    out["optimizer_states"] = [{"state": opt_state, "param_groups": groups}]
    out["lr_schedulers"] = [
        regroup_scheduler_state(s, record["group_origin"], to_original=True) for s in out.get("lr_schedulers", [])
    ]
    return out


def _load_layout_free(path: str) -> dict[str, Any]:
    """A layout-free checkpoint (sharded directory or plain file) as one plain dict with every expert."""
    from moe_plugin.lightning.checkpoint_io import load_weights_only
    from moe_plugin.parallel.checkpoint import consolidate, is_sharded_checkpoint

    if is_sharded_checkpoint(path):
        return consolidate(path, load_weights_only)
    obj = load_weights_only(path)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise DeepSpeedCheckpointError(f"{path} is not a Lightning checkpoint (no state_dict).")
    return obj


def to_deepspeed_directory(
    path: str, out: str, world_size: int, expert_parallel_size: int, stage: int, timeout_seconds: float = 600.0
) -> dict[str, Any]:
    """A layout-free checkpoint -> DeepSpeed's checkpoint directory for deepspeed_ep at (W, EP, ZeRO stage).

    DeepSpeed's engine writes the files (parallel/deepspeed_export.py); the model is rebuilt from the
    checkpoint's `model_config` and the optimizer groups from configure_optimizers' rule (lightning/module.py).
    Returns the plain checkpoint it converted (for the summary)."""
    import functools

    from moe_plugin.models.decoder import MoEDecoderLM
    from moe_plugin.models.param_groups import decay_groups
    from moe_plugin.parallel.deepspeed_export import export_deepspeed_checkpoint

    plain = _load_layout_free(path)
    config = plain.get("model_config")
    if not config:
        raise DeepSpeedCheckpointError(
            f"{path} carries no model_config (saved by an older moe_plugin): the model cannot be rebuilt to lay out "
            "DeepSpeed's partitions. Resume it once with strategy=deepspeed_ep (it reads layout-free checkpoints "
            "directly) and save with strategy.checkpoint_format=deepspeed instead."
        )
    with torch.device("meta"):
        names = [list(g) for g in decay_groups(MoEDecoderLM(**config), prefix="model.")]
    groups = (plain.get("optimizer_states") or [{}])[0].get("param_groups", [])
    if [len(g["params"]) for g in groups] != [len(n) for n in names]:
        raise DeepSpeedCheckpointError(
            f"{path}: optimizer groups of sizes {[len(g['params']) for g in groups]}, but MoELanguageModule's "
            f"configure_optimizers makes {[len(n) for n in names]} for this model: only checkpoints of "
            "MoELanguageModule's optimizer (or saved without optimizer state: nothing to convert) are supported."
        )
    export_deepspeed_checkpoint(
        plain,
        out,
        functools.partial(MoEDecoderLM, **config),
        names,
        world_size,
        expert_parallel_size,
        stage,
        timeout_seconds,
    )
    return plain


def convert_command(
    path: str,
    out: str,
    as_json: bool = False,
    world_size: int | None = None,
    expert_parallel_size: int = 1,
    stage: int = 2,
) -> int:
    """`moe-plugin ckpt convert SRC OUT`: a deepspeed_ep DeepSpeed directory -> one layout-free checkpoint file;
    a layout-free checkpoint (directory or file) with --world-size W -> a DeepSpeed directory for deepspeed_ep."""
    import json

    if not Path(path).exists():
        print(f"moe-plugin ckpt convert: {path} does not exist.")
        return 2
    if not is_deepspeed_checkpoint(path):
        if world_size is None:
            print(
                f"moe-plugin ckpt convert: {path} is a moe_plugin (layout-free) checkpoint. To write a DeepSpeed "
                "checkpoint directory from it, give the target layout: --world-size W [--expert-parallel-size EP] "
                "[--stage 1|2]. (strategy=deepspeed_ep also resumes it directly, at any layout.)"
            )
            return 2
        try:
            plain = to_deepspeed_directory(path, out, world_size, expert_parallel_size, stage)
        except (DeepSpeedCheckpointError, ValueError) as err:
            print(f"moe-plugin ckpt convert: {err}")
            return 2
        summary = {
            "out": out,
            "format": "deepspeed",
            "world_size": world_size,
            "expert_parallel_size": expert_parallel_size,
            "zero_stage": stage,
            "global_step": plain.get("global_step"),
        }
        print(
            json.dumps(summary)
            if as_json
            else f"wrote DeepSpeed checkpoint {out} (ZeRO-{stage}, W={world_size}, EP={expert_parallel_size}, "
            f"step {summary['global_step']}); resume: strategy=deepspeed_ep strategy.stage={stage} "
            f"strategy.expert_parallel_size={expert_parallel_size} trainer.devices={world_size} ckpt_path={out}"
        )
        return 0
    try:
        plain = to_plain_checkpoint(path)
    except DeepSpeedCheckpointError as err:
        print(f"moe-plugin ckpt convert: {err}")
        return 2
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(plain, target)
    summary = {"out": str(target), "bytes": target.stat().st_size, "global_step": plain.get("global_step")}
    print(
        json.dumps(summary)
        if as_json
        else f"wrote {target} ({summary['bytes']:,} bytes, step {summary['global_step']})"
    )
    return 0
