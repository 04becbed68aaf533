"""Checkpoint format version 2: the fully sharded layout's dense state through torch.distributed.checkpoint.

The format is described in checkpoint.py (which owns it); this file holds the parts that touch DTensors
and DCP:

    save  split_sharded_checkpoint  this rank's Lightning dict -> (meta, expert shard, dense DTensors)
                                    expert slices are gathered from their FSDP shards (collective over the
                                    expert shard group, the same order on every rank)
          save_dense                dcp.save of the dense DTensors (collective over the world)
    load  read_dense_full           a version-2 folder's dense state as whole tensors (for a replicated
                                    layout: DDP, one process, consolidate); every reader reads everything
          load_into_sharded         any checkpoint (plain file, version 1 or 2 directory) straight into an
                                    FSDP-sharded module and its optimizers, in place: DCP reads only this
                                    rank's dense shards; experts by global index, sliced to this rank's shard

Keys in DCP: "model/<parameter name>" and "optim/<optimizer index>/<parameter name>/<state key>".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moe_plugin.parallel.checkpoint import (
    DENSE_DCP_KEY,
    DENSE_DIR,
    FORMAT_VERSION,
    LAYOUT_KEY,
    CheckpointFormatError,
    ShardedLayout,
    _read_sources,
    optimizer_param_names,
    optimizer_state_from_named,
    shard_file_name,
    split_checkpoint,
)
from moe_plugin.parallel.dcp_reader import SafeFileSystemReader


def _model_key(name: str) -> str:
    return f"model/{name}"


def _optim_key(i: int, name: str, key: str) -> str:
    return f"optim/{i}/{name}/{key}"


def _full(t: Any) -> Any:
    return t.full_tensor() if isinstance(t, DTensor) else t


# ------------------------------------------------------------------------------------------------------ save
def split_sharded_checkpoint(
    checkpoint: dict[str, Any], layout: ShardedLayout, optimizer_names: list[list[list[str]]], shard_size: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, DTensor]]:
    """(meta, expert shard, dense DTensors by DCP key). Collective: every rank calls it (expert gathers)."""
    meta, shard = split_checkpoint(checkpoint, layout, optimizer_names)
    shard["format_version"] = FORMAT_VERSION
    for n in shard["experts"]:  # same order on every rank: the model's parameter order
        shard["experts"][n]["tensor"] = _full(shard["experts"][n]["tensor"])
    for states in shard.get("optimizer_states", []):
        for n in list(states):
            states[n] = {k: _full(v) for k, v in states[n].items()}
    dense: dict[str, DTensor] = {}
    for name in list(meta["state_dict"]):
        if isinstance(meta["state_dict"][name], DTensor):
            dense[_model_key(name)] = meta["state_dict"].pop(name)
    for i, opt in enumerate(meta.get("optimizer_states", [])):
        for name, st in list(opt["state"].items()):
            # new dicts: the state dicts are the optimizer's live ones (optimizer.state_dict() does not copy)
            opt["state"][name] = {k: v for k, v in st.items() if not isinstance(v, DTensor)}
            for key, v in st.items():
                if isinstance(v, DTensor):
                    dense[_optim_key(i, name, key)] = v
    layout_info = meta[LAYOUT_KEY]
    layout_info["format_version"] = FORMAT_VERSION
    layout_info["data_parallel_shard_size"] = shard_size
    layout_info["dense_dcp"] = DENSE_DIR
    layout_info["expert_files"] = [
        shard_file_name(j, layout.expert_parallel_size) for j in range(layout.expert_parallel_size)
    ]
    return meta, shard, dense


def save_dense(dense: dict[str, DTensor], folder: str | Path) -> list[str]:
    """dcp.save of the dense shards (collective). Returns the files this call wrote, relative to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dcp.save(dense, checkpoint_id=str(folder))
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.endswith(".sha256"))


# ------------------------------------------------------------------------------------------------------ load
def read_dense_full(folder: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder whose key starts with `prefix` ("model/": parameters only, no optimizer
    state), as a whole tensor (collective if a process group is initialised)."""
    reader = SafeFileSystemReader(str(folder))
    md = reader.read_metadata()
    out: dict[str, Any] = {}
    for key, item in md.state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(item, "size"):  # TensorStorageMetadata (bytes items have no size)
            out[key] = torch.empty(item.size, dtype=item.properties.dtype)
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        # without a process group DCP warns that it "assumes the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(out, storage_reader=reader, no_dist=no_dist)
    return out


def merge_dense_full(meta: dict[str, Any], dense_opt: list[dict[str, Any]] | None) -> None:
    """Fill a version-2 meta dict (and its named dense optimizer state) with whole dense tensors, in place."""
    folder = meta.pop(DENSE_DCP_KEY, None)
    if folder is None:
        return
    for key, t in read_dense_full(folder).items():
        kind, rest = key.split("/", 1)
        if kind == "model":
            meta["state_dict"][rest] = t
        elif dense_opt is not None:
            i, name, skey = rest.split("/", 2)
            dense_opt[int(i)]["state"].setdefault(name, {})[skey] = t


def copy_full_into_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole tensor `full` into `target` (a DTensor: only this rank's shard is copied)."""
    if isinstance(target, DTensor):
        if tuple(full.shape) != tuple(target.shape):
            raise CheckpointFormatError(
                f"shape {tuple(full.shape)} in the checkpoint, {tuple(target.shape)} in the model"
            )
        # src_data_rank=None: every rank slices its own copy, no communication
        local = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(local.to_local())
    else:
        target.copy_(full)


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (zeros) with a step of learning rate 0, so it can be loaded in place."""
    if optimizer.state:
        return
    lrs = []
    for group in optimizer.param_groups:
        lrs.append(group["lr"])
        group["lr"] = 0.0
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for st in optimizer.state.values():  # the zero step counted as one: undo
        for k, v in st.items():
            if k == "step" and torch.is_tensor(v):
                v.zero_()


@torch.no_grad()
def load_into_sharded(
    path: str | Path,
    module: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    expert_params: dict[str, tuple[int, int, int]],
    load_file: Callable[[str], dict[str, Any]],
) -> dict[str, Any]:
    """Load checkpoint `path` (any layout or version) into the FSDP-sharded `module` and `optimizers` in place.

    Returns the rest of the checkpoint (loops, callbacks, schedulers, ...) without "state_dict" and
    "optimizer_states". Collective: every rank calls it.
    """
    names = [optimizer_param_names(o, module) for o in optimizers]
    meta, source, dense_opt = _read_sources(path, load_file, names)
    params = dict(module.named_parameters())
    by_name: list[dict[str, dict[str, Any]]] = []  # per optimizer: parameter name -> its (live) state dict
    for o, nm in zip(optimizers, names):
        init_optimizer_state(o)
        flat = [p for g in o.param_groups for p in g["params"]]
        by_name.append({n: o.state[p] for n, p in zip([n for g in nm for n in g], flat)})

    folder = meta.pop(DENSE_DCP_KEY, None)
    if folder is not None:  # version 2: each rank reads its own dense shards (any shard size: DCP reshards)
        targets: dict[str, Any] = {}
        for n, p in params.items():
            if n not in expert_params:
                targets[_model_key(n)] = p
        if dense_opt is not None:
            for i, states in enumerate(by_name):
                for n, st in states.items():
                    if n in expert_params:
                        continue
                    for k, v in st.items():
                        if torch.is_tensor(v) and (isinstance(v, DTensor) or v.dim() > 0):
                            targets[_optim_key(i, n, k)] = v
        _load_targets(folder, targets)
    state_dict = meta.pop("state_dict")
    for n, t in state_dict.items():  # version 1 / plain: whole dense tensors; buffers in every version
        target = params.get(n)
        if target is None:
            target = dict(module.named_buffers()).get(n)
        if target is None:
            raise CheckpointFormatError(f"{path}: unexpected key {n} (resume with the model it was saved with)")
        copy_full_into_(target, t)
    for name, (E, start, stop) in expert_params.items():
        saved_E = source.expert_params.get(name, E)
        if saved_E != E:
            raise CheckpointFormatError(
                f"{path} stores {saved_E} experts for {name}, the model has {E} (model.moe.num_experts)."
            )
        copy_full_into_(params[name], source.tensor(name, start, stop))
    if dense_opt is not None:
        for i, (o, named, states) in enumerate(zip(optimizers, dense_opt, by_name)):
            for n, st in named["state"].items():
                for k, v in st.items():
                    _set_state(states[n], k, v)
            for name, (_, start, stop) in expert_params.items():
                st = source.optimizer_state(i, name, start, stop)
                for k, v in (st or {}).items():
                    _set_state(states[name], k, v)
            groups = optimizer_state_from_named({"state": {}, "param_groups": named["param_groups"]}, names[i])
            for g, saved in zip(o.param_groups, groups["param_groups"]):
                g.update({k: v for k, v in saved.items() if k != "params"})
    return meta


def _set_state(state: dict[str, Any], key: str, value: Any) -> None:
    if key in state and torch.is_tensor(state[key]) and torch.is_tensor(value):
        if state[key].dim() == 0 and not isinstance(state[key], DTensor):
            state[key].copy_(value)
        else:
            copy_full_into_(state[key], value)
    else:
        state[key] = value.clone() if torch.is_tensor(value) else value


def _load_targets(folder: str, targets: dict[str, Any]) -> None:
    reader = SafeFileSystemReader(folder)
    saved = set(reader.read_metadata().state_dict_metadata)
    missing = [k for k in targets if k not in saved]
    if missing:
        raise CheckpointFormatError(
            f"{folder} has no {missing[:3]}: resume with the model and optimizer the checkpoint was saved with."
        )
    dcp.load(targets, storage_reader=reader)
