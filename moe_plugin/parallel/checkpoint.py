"""Sharded, topology-independent checkpoints for expert parallelism (format owned here; see
docs/reliability.md: how files are written atomically/asynchronously is the CheckpointIO's business).

Vocabulary: E global experts of a layer, L local experts of a rank, W world size, EP expert-parallel size.

A checkpoint saved under expert parallelism is a DIRECTORY P:

    P/meta.pt                          written by global rank 0: the whole Lightning checkpoint dict minus
                                       expert tensors (dense weights, dense optimizer state, schedulers,
                                       loops, callbacks, data position, hparams) plus
                                       "moe_plugin_layout": {format_version, expert_parallel_size,
                                       world_size, num_experts {layer: E}, expert_params {name: E},
                                       shard_files [...]}
    P/experts-ep{j:03d}-of-{EP:03d}.pt written by the first replica (dp_rank 0) of expert-group rank j:
                                       {"experts": {name: {"start", "tensor" [L, ...]}},
                                        "optimizer_states": [{name: {state key: tensor [L, ...] or scalar}}]}

Experts are identified by global index: shard j holds global experts [j*E/EP, (j+1)*E/EP) of every layer.
Optimizer state is stored by parameter NAME (not by the optimizer's integer ids), so it maps onto any
layout: per-expert state tensors (Adam's exp_avg, exp_avg_sq: same shape as the parameter) are sliced
and concatenated along the expert dimension like the weights; scalar state (step) is copied.

Format version 2 (written when the dense part is fully sharded, strategy.data_parallel_shard_size > 1):
the same meta.pt and expert shard files (each expert slice gathered from its FSDP shards over the expert
shard group before the first replica writes it), plus the sharded dense state written collectively by
every rank through torch.distributed.checkpoint (DCP, see dense_dcp.py):

    P/dense/                           DCP: "model/<name>" dense parameters and "optim/<i>/<name>/<key>"
                                       dense optimizer state, as DTensor shards; resharded on load
    meta.pt                            layout: + data_parallel_shard_size, "dense_dcp": "dense",
                                       "expert_files" (the experts-*.pt), "shard_files" (every file of the
                                       checkpoint, checksum sidecars included: what validity checks read)

Version-1 directories (no DCP, dense state in meta.pt) load at every layout as before.

Loading builds, for the loading rank, an ordinary Lightning checkpoint dict (its local expert slices,
integer-keyed optimizer state for its own optimizers), from either a directory at any EP/world size or
a plain single-file Lightning checkpoint (no expert parallelism). No rank reads the shards it does not
need. `consolidate` turns a directory into one plain file that plain Lightning training resumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 2  # the newest version this code reads and writes
# a replicated dense part (DDP, strategy.data_parallel_shard_size=1) is still written as version 1, which
# earlier moe_plugin releases read too; version 2 = dense state in DCP (checkpoint_sharded.py)
REPLICATED_FORMAT_VERSION = 1
META_FILE = "meta.pt"
LAYOUT_KEY = "moe_plugin_layout"
DENSE_DIR = "dense"
# key of the loaded meta dict that points at a version-2 checkpoint's DCP folder (never written to disk)
DENSE_DCP_KEY = "_moe_plugin_dense_dcp"


class CheckpointFormatError(ValueError):
    """A checkpoint that cannot be loaded into the current model/layout; the message says why and what to do."""


def shard_file_name(ep_rank: int, expert_parallel_size: int) -> str:
    return f"experts-ep{ep_rank:03d}-of-{expert_parallel_size:03d}.pt"


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    return Path(path).is_dir() and (Path(path) / META_FILE).exists()


# ------------------------------------------------------------------------------------ optimizer state by name
def optimizer_param_names(optimizer: torch.optim.Optimizer, module: nn.Module) -> list[list[str]]:
    """Names of the optimizer's parameters, per param group, in the optimizer's order."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        try:
            out.append([by_id[id(p)] for p in group["params"]])
        except KeyError as err:
            raise CheckpointFormatError(
                "the optimizer holds a parameter that is not a parameter of the LightningModule; expert-parallel "
                "checkpoints store optimizer state by parameter name."
            ) from err
    return out


def optimizer_state_to_named(osd: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """torch optimizer state_dict (integer ids) -> {"state": {name: ...}, "param_groups": [{..., "params": [names]}]}."""
    flat = [n for group in names for n in group]
    groups = []
    for g, group_names in zip(osd["param_groups"], names):
        if len(g["params"]) != len(group_names):
            raise CheckpointFormatError("optimizer state_dict and optimizer disagree on the parameters of a group.")
        groups.append({**g, "params": [flat[i] for i in g["params"]]})
    return {"state": {flat[i]: s for i, s in osd["state"].items()}, "param_groups": groups}


def optimizer_state_from_named(named: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """Inverse of optimizer_state_to_named for an optimizer whose groups hold `names` (its current order)."""
    saved_groups = named["param_groups"]
    if len(saved_groups) != len(names):
        raise CheckpointFormatError(
            f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, the current one {len(names)}. "
            "Resume with the same optimizer configuration (optim=...)."
        )
    index: dict[str, int] = {}
    groups = []
    for g, current in zip(saved_groups, names):
        if set(g["params"]) != set(current):
            missing, extra = set(current) - set(g["params"]), set(g["params"]) - set(current)
            raise CheckpointFormatError(
                f"optimizer parameter group mismatch: the current model has {sorted(missing)[:3]} not in the "
                f"checkpoint and the checkpoint has {sorted(extra)[:3]} not in the model. Resume with the same model."
            )
        ids = []
        for n in current:
            index[n] = len(index)
            ids.append(index[n])
        groups.append({**g, "params": ids})
    return {"state": {index[n]: s for n, s in named["state"].items() if n in index}, "param_groups": groups}


# ------------------------------------------------------------------------------------------------------ save
@dataclass
class ShardedLayout:
    """This rank's view of the expert-parallel layout, as the save/load functions need it."""

    world_size: int
    rank: int
    expert_parallel_size: int
    # name -> (global E, local start, local stop)
    expert_params: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def ep_rank(self) -> int:
        return self.rank % self.expert_parallel_size

    @property
    def writes_shard(self) -> bool:
        """Only the first replica of each expert slice writes it (replicas are identical)."""
        return self.rank < self.expert_parallel_size


def split_checkpoint(
    checkpoint: dict[str, Any], layout: ShardedLayout, optimizer_names: list[list[list[str]]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """This rank's Lightning checkpoint dict -> (meta dict, expert shard dict). Pure; writes nothing."""
    expert = layout.expert_params
    state_dict = checkpoint["state_dict"]
    meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    meta["state_dict"] = {k: v for k, v in state_dict.items() if k not in expert}
    shard: dict[str, Any] = {
        "format_version": REPLICATED_FORMAT_VERSION,
        "expert_parallel_size": layout.expert_parallel_size,
        "ep_rank": layout.ep_rank,
        "experts": {n: {"start": start, "tensor": state_dict[n]} for n, (_, start, _) in expert.items()},
    }
    if "optimizer_states" in checkpoint:
        named = [optimizer_state_to_named(o, nm) for o, nm in zip(checkpoint["optimizer_states"], optimizer_names)]
        meta["optimizer_states"] = [
            {"state": {n: s for n, s in o["state"].items() if n not in expert}, "param_groups": o["param_groups"]}
            for o in named
        ]
        shard["optimizer_states"] = [{n: s for n, s in o["state"].items() if n in expert} for o in named]
    num_experts = {n.rsplit(".experts.", 1)[0]: e for n, (e, _, _) in expert.items()}
    meta[LAYOUT_KEY] = {
        "format_version": REPLICATED_FORMAT_VERSION,
        "expert_parallel_size": layout.expert_parallel_size,
        "world_size": layout.world_size,
        "num_experts": num_experts,
        "expert_params": {n: e for n, (e, _, _) in expert.items()},
        "shard_files": [shard_file_name(j, layout.expert_parallel_size) for j in range(layout.expert_parallel_size)],
    }
    return meta, shard


def save_sharded(
    checkpoint: dict[str, Any],
    path: str | os.PathLike[str],
    layout: ShardedLayout,
    optimizer_names: list[list[list[str]]],
    save_file: Callable[[dict[str, Any], str], None],
) -> None:
    """Write this rank's part of directory checkpoint `path` through `save_file(dict, file_path)`.

    Collective in spirit (every rank calls it; the caller barriers afterwards) but it communicates
    nothing: rank 0 writes meta.pt, the first replica of each expert slice writes its shard.
    """
    meta, shard = split_checkpoint(checkpoint, layout, optimizer_names)
    path = Path(path)
    if path.is_file():  # a plain checkpoint of an earlier run at the same name (e.g. last.ckpt)
        if layout.rank == 0:
            path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    if layout.writes_shard:
        save_file(shard, str(path / shard_file_name(layout.ep_rank, layout.expert_parallel_size)))
    if layout.rank == 0:
        save_file(meta, str(path / META_FILE))


# ------------------------------------------------------------------------------------------------------ load
class _ExpertSource:
    """Expert tensors and their optimizer state by global expert index, read lazily from the shards."""

    def __init__(
        self,
        expert_params: dict[str, int],
        shard_ranges: list[tuple[Callable[[], dict[str, Any]], int, int]],
    ) -> None:
        # shard_ranges: (loader, j, EP) for directory shards; loaders are called at most once
        self.expert_params = expert_params
        self._shards = shard_ranges
        self._cache: dict[int, dict[str, Any]] = {}

    def _shard(self, i: int) -> dict[str, Any]:
        if i not in self._cache:
            self._cache[i] = self._shards[i][0]()
        return self._cache[i]

    def _pieces(self, name: str, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(shard index, local from, local to) covering global experts [start, stop) of `name`."""
        E = self.expert_params[name]
        out = []
        for i, (_, j, ep) in enumerate(self._shards):
            lo, hi = j * E // ep, (j + 1) * E // ep
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                out.append((i, a - lo, b - lo))
        return out

    def tensor(self, name: str, start: int, stop: int) -> torch.Tensor:
        parts = [self._shard(i)["experts"][name]["tensor"][a:b] for i, a, b in self._pieces(name, start, stop)]
        return torch.cat(parts, dim=0).clone() if len(parts) > 1 else parts[0].clone()

    def optimizer_state(self, opt_idx: int, name: str, start: int, stop: int) -> dict[str, Any] | None:
        pieces = self._pieces(name, start, stop)
        states = []
        for i, a, b in pieces:
            opt_states = self._shard(i).get("optimizer_states") or []
            st = opt_states[opt_idx].get(name) if opt_idx < len(opt_states) else None
            states.append((st, a, b, self._shard(i)["experts"][name]["tensor"].shape))
        if all(st is None for st, *_ in states):
            return None
        if any(st is None for st, *_ in states):
            raise CheckpointFormatError(f"optimizer state of {name} is present in some expert shards but not others.")
        out: dict[str, Any] = {}
        for key, first in states[0][0].items():  # type: ignore[union-attr]
            if torch.is_tensor(first) and first.shape == states[0][3]:  # per-expert state: slice like the weight
                parts = [st[key][a:b] for st, a, b, _ in states]  # type: ignore[index]
                out[key] = torch.cat(parts, dim=0).clone()
            else:
                out[key] = first.clone() if torch.is_tensor(first) else first
        return out


def _read_sources(
    path: str | os.PathLike[str],
    load_file: Callable[[str], dict[str, Any]],
    fallback_names: list[list[list[str]]] | None,
) -> tuple[dict[str, Any], _ExpertSource, list[dict[str, Any]] | None]:
    """(meta without layout, expert source, named optimizer states of the dense part) from a directory or a file."""
    p = Path(path)
    if p.is_dir():
        if not (p / META_FILE).exists():
            raise CheckpointFormatError(
                f"{p} is a directory without {META_FILE}: not a moe_plugin checkpoint, or an incomplete one "
                "(its writer died). Resume from an earlier checkpoint."
            )
        meta = load_file(str(p / META_FILE))
        layout = meta.pop(LAYOUT_KEY)
        if layout.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointFormatError(
                f"{p} has checkpoint format_version {layout['format_version']}, newer than this moe_plugin "
                f"({FORMAT_VERSION}). Upgrade moe_plugin."
            )
        ep = layout["expert_parallel_size"]
        names = layout.get("expert_files", layout["shard_files"])
        shards = [(lambda f=f: load_file(str(p / f)), j, ep) for j, f in enumerate(names)]
        if layout.get("dense_dcp"):
            meta[DENSE_DCP_KEY] = str(p / layout["dense_dcp"])
        return meta, _ExpertSource(layout["expert_params"], shards), meta.pop("optimizer_states", None)
    ckpt = load_file(str(p))
    if LAYOUT_KEY in ckpt:
        raise CheckpointFormatError(f"{p} is the meta file of a sharded checkpoint: pass its directory {p.parent}.")
    return _plain_as_sources(ckpt, fallback_names)


def _plain_as_sources(
    ckpt: dict[str, Any], names: list[list[list[str]]] | None
) -> tuple[dict[str, Any], _ExpertSource, list[dict[str, Any]] | None]:
    """A plain single-file checkpoint seen as meta + one shard holding every expert ([0, E))."""
    state_dict = ckpt["state_dict"]
    opt_named = None
    if "optimizer_states" in ckpt:
        if names is None:
            raise CheckpointFormatError("a plain checkpoint's optimizer state needs the optimizer's parameter names.")
        opt_named = [optimizer_state_to_named(o, nm) for o, nm in zip(ckpt["optimizer_states"], names)]
    meta = {k: v for k, v in ckpt.items() if k != "optimizer_states"}
    return meta, _PlainSource(state_dict, opt_named, {}), opt_named


class _PlainSource(_ExpertSource):
    """Every expert of every layer in one full tensor (a checkpoint saved without expert parallelism)."""

    def __init__(
        self, state_dict: dict[str, Any], opt_named: list[dict[str, Any]] | None, expert_params: dict[str, int]
    ):
        shard = {
            "experts": {n: {"start": 0, "tensor": t} for n, t in state_dict.items()},
            "optimizer_states": [o["state"] for o in opt_named] if opt_named else [],
        }
        super().__init__(expert_params, [(lambda: shard, 0, 1)])

    def _pieces(self, name: str, start: int, stop: int) -> list[tuple[int, int, int]]:
        return [(0, start, stop)]


def _merge_dense_full(meta: dict[str, Any], dense_opt: list[dict[str, Any]] | None) -> None:
    """Version 2: read the DCP dense state whole into meta/dense_opt (a replicated layout needs all of it)."""
    if DENSE_DCP_KEY in meta:
        from moe_plugin.parallel.checkpoint_sharded import merge_dense_full  # DCP only when a v2 dir is read

        merge_dense_full(meta, dense_opt)


def load_for_rank(
    path: str | os.PathLike[str],
    expert_params: dict[str, tuple[int, int, int]],
    optimizer_names: list[list[list[str]]],
    load_file: Callable[[str], dict[str, Any]],
) -> dict[str, Any]:
    """A Lightning checkpoint dict for a rank holding global experts `expert_params[name] = (E, start, stop)`.

    `path` is a sharded directory saved at any EP/world size or a plain file; `optimizer_names` are the
    current optimizers' parameter names (optimizer_param_names).
    """
    meta, source, dense_opt = _read_sources(path, load_file, optimizer_names)
    _merge_dense_full(meta, dense_opt)
    if isinstance(source, _PlainSource):
        source.expert_params = {n: e for n, (e, _, _) in expert_params.items()}
    out = dict(meta)
    state_dict = dict(meta["state_dict"])
    for name, (E, start, stop) in expert_params.items():
        saved_E = source.expert_params.get(name)
        if saved_E is None and isinstance(source, _PlainSource) and name in state_dict:
            saved_E = state_dict[name].shape[0]
        if saved_E is None:
            raise CheckpointFormatError(
                f"{path} has no expert parameter {name}. Resume with the model configuration the checkpoint was saved with."
            )
        if saved_E != E:
            raise CheckpointFormatError(
                f"{path} stores {saved_E} experts for {name}, the model has {E} (model.moe.num_experts). "
                "Resume with the number of experts the checkpoint was saved with."
            )
        state_dict[name] = source.tensor(name, start, stop)
    out["state_dict"] = state_dict
    if dense_opt is not None:
        opt_states = []
        for i, (named, names) in enumerate(zip(dense_opt, optimizer_names)):
            state = {n: s for n, s in named["state"].items() if n not in expert_params}
            for name, (_, start, stop) in expert_params.items():
                st = source.optimizer_state(i, name, start, stop)
                if st is not None:
                    state[name] = st
            opt_states.append(
                optimizer_state_from_named({"state": state, "param_groups": named["param_groups"]}, names)
            )
        out["optimizer_states"] = opt_states
    return out


def read_dense_and_experts(
    path: str | os.PathLike[str], load_file: Callable[[str], dict[str, Any]]
) -> tuple[dict[str, torch.Tensor], Callable[[str], torch.Tensor]]:
    """(every dense parameter, whole) and a reader of one expert parameter over all experts, of a sharded
    directory at any format version; no optimizer state is read. For readers of the model only (export,
    generation), which take one layer's experts at a time."""
    meta, source, _ = _read_sources(path, load_file, None)
    state = dict(meta["state_dict"])
    folder = meta.pop(DENSE_DCP_KEY, None)
    if folder is not None:
        from moe_plugin.parallel.checkpoint_sharded import read_dense_full  # DCP only when a v2 dir is read

        state.update({k[len("model/") :]: t for k, t in read_dense_full(folder, prefix="model/").items()})

    def expert(name: str) -> torch.Tensor:
        if name not in source.expert_params:
            raise CheckpointFormatError(f"{path} has no expert parameter {name} (model config and weights disagree).")
        return source.tensor(name, 0, source.expert_params[name])

    return state, expert


def consolidate(path: str | os.PathLike[str], load_file: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """A sharded directory -> one plain Lightning checkpoint dict with every expert (for one device or export).

    Optimizer state is re-keyed by the integer ids of a plain single-process optimizer built by the same
    configure_optimizers (same parameter order as when saved). Reads every shard: use it offline.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointFormatError(f"{p} is not a sharded checkpoint directory (it is already a single file).")
    meta, source, dense_opt = _read_sources(p, load_file, None)
    _merge_dense_full(meta, dense_opt)
    full = {n: (e, 0, e) for n, e in source.expert_params.items()}
    names = [[g["params"] for g in o["param_groups"]] for o in dense_opt] if dense_opt else []
    out = dict(meta)
    out["state_dict"] = dict(meta["state_dict"])
    for name, (_, start, stop) in full.items():
        out["state_dict"][name] = source.tensor(name, start, stop)
    if dense_opt is not None:
        states = []
        for i, (named, nm) in enumerate(zip(dense_opt, names)):
            state = dict(named["state"])
            for name, (_, start, stop) in full.items():
                st = source.optimizer_state(i, name, start, stop)
                if st is not None:
                    state[name] = st
            states.append(optimizer_state_from_named({"state": state, "param_groups": named["param_groups"]}, nm))
        out["optimizer_states"] = states
    return out


def describe(path: str | os.PathLike[str], load_file: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Summary of a checkpoint (sharded or plain) for `moe-plugin ckpt inspect`. Reads meta.pt only."""
    p = Path(path)
    sharded = p.is_dir()
    meta = load_file(str(p / META_FILE)) if sharded else load_file(str(p))
    layout = meta.get(LAYOUT_KEY)
    sd = meta.get("state_dict", {})
    info: dict[str, Any] = {
        "path": str(p),
        "kind": "sharded" if sharded else "plain",
        "epoch": meta.get("epoch"),
        "global_step": meta.get("global_step"),
        "lightning_version": meta.get("pytorch-lightning_version"),
        "dense_tensors": len(sd),
        "dense_parameters": int(sum(t.numel() for t in sd.values() if torch.is_tensor(t))),
        "optimizers": len(meta.get("optimizer_states", []) or []),
        "lr_schedulers": len(meta.get("lr_schedulers", []) or []),
        "data_position": None,
        "corpus": None,
    }
    data_state = next((v for v in meta.values() if isinstance(v, dict) and {"epoch", "samples"} <= set(v)), None)
    if data_state is not None:  # the data module's state: position, and the corpus fingerprint (data/datamodule.py)
        info["data_position"] = {"epoch": data_state["epoch"], "samples": data_state["samples"]}
        info["corpus"] = data_state.get("corpus")
    if layout is not None:
        info.update(
            {
                "format_version": layout["format_version"],
                "expert_parallel_size": layout["expert_parallel_size"],
                "world_size": layout["world_size"],
                "num_experts": layout["num_experts"],
                "shard_files": layout["shard_files"],
                "missing_files": [f for f in layout["shard_files"] if not (p / f).exists()],
            }
        )
    return info
