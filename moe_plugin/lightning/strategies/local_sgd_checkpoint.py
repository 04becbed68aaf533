"""Checkpoints of the local_sgd strategy: every island's part of one directory, and the outer state.

A checkpoint is the expert-parallel directory format (moe_plugin/parallel/checkpoint.py), written per island:

    P/                    island 0: meta.pt + expert shards of ITS layout (its EP size)
    P/island{k:03d}/      island k >= 1, the same, with its own EP size

Each island stores its own weights and inner optimizer state (never averaged), plus the outer state that is
identical on every island: the synchronised weights and the outer momentum as extra state-dict entries
`_local_sgd.synced.<name>` / `_local_sgd.momentum.<name>` (expert ones sharded by global expert id like the
weights, so any EP size can load them), and under the `local_sgd` key the islands, the round, the next round's
schedule and the detectors' statistics. P/meta.pt lists the other islands' files under
`moe_plugin_extra_files`, which checkpoint validation (lightning/checkpoint_io.py) also checks: P is valid,
and resume=auto picks it, only when every island's part is complete.

Saves are deferred until every island is at the same cut (`_settle`), then every island writes its part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from moe_plugin.parallel.checkpoint import (
    META_FILE,
    ShardedLayout,
    is_sharded_checkpoint,
    load_for_rank,
    save_sharded,
    shard_file_name,
)
from moe_plugin.parallel.islands import parse_expert_parallel_sizes
from moe_plugin.parallel.outer import all_gather_objects, sum_over_group

OUTER_PREFIX = "_local_sgd."
PREFIX_SYNCED = OUTER_PREFIX + "synced."
PREFIX_MOMENTUM = OUTER_PREFIX + "momentum."
META_KEY = "local_sgd"
EXTRA_FILES_KEY = "moe_plugin_extra_files"  # files of P that checkpoint validation must also find intact


def drop_outer_state(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A copy of `checkpoint` without local_sgd's outer state: the `_local_sgd.*` state-dict entries (synchronised
    weights, outer momentum), the `local_sgd` key and the island file list. What remains is island 0's model and
    inner optimizer state as a plain checkpoint, which loads with strict=True under any strategy (used by
    `moe-plugin ckpt consolidate`; HF export reads only `model.*` entries anyway). Returns (copy, entries dropped).
    """
    out = {k: v for k, v in checkpoint.items() if k not in (META_KEY, EXTRA_FILES_KEY)}
    state = checkpoint.get("state_dict", {})
    out["state_dict"] = {k: v for k, v in state.items() if not k.startswith(OUTER_PREFIX)}
    return out, len(state) - len(out["state_dict"])


def island_dir(path: str | Path, island: int) -> Path:
    """Where island `island` keeps its part of checkpoint P (island 0 is P itself)."""
    return Path(path) if island == 0 else Path(path) / f"island{island:03d}"


class IslandCheckpoints:
    """Mixin of LocalSGDStrategy (placed before ExpertParallelStrategy in its bases): checkpoint save/load."""

    # provided by LocalSGDStrategy / ExpertParallelStrategy
    mesh: Any
    plan: Any
    checkpoint_io: Any
    expert_parallel_size: int
    outer_momentum: float
    _ep_config: Any
    _pending: list[str]
    _saving_now: bool
    _outer_ready: bool
    _synced: list[torch.Tensor]
    _momentum: list[torch.Tensor]
    _detectors: list[Any]
    _round: int
    _round_start_step: int
    _round_steps: int
    _final: bool
    synced_island_steps: int
    # and the methods _trainable (LocalSGDStrategy), _optimizer_names and barrier (ExpertParallelStrategy)

    def _settle(self, trainer: pl.Trainer) -> None:
        """Write the saves any island requested, on every island, if some island has one pending (collective).

        Settle points, where every island arrives in the same order: each sync and the end of fit; with
        step-based sync also the end of every training batch and of every validation (islands then run the same
        steps), so a save lands at the step it was requested. ModelCheckpoint decides on each island before
        anything is written, so no island sees another's directory while choosing a file name."""
        assert self.mesh is not None
        flag = torch.zeros(1, dtype=torch.float64)
        flag[0] = float(bool(self._pending) and self.mesh.rank == 0)
        if sum_over_group(flag, self.mesh.outer_group)[0] > 0:
            self._write_pending(trainer)
        else:
            self._pending = []

    def _expert_params(self) -> dict[str, tuple[int, int, int]]:
        """The model's expert tensors plus their outer copies (sharded by global expert id like the weights)."""
        assert self.plan is not None
        out = dict(self.plan.expert_params)
        for name, spec in self.plan.expert_params.items():
            out[PREFIX_SYNCED + name] = spec
            if self.outer_momentum > 0:
                out[PREFIX_MOMENTUM + name] = spec
        return out

    def _layout(self) -> ShardedLayout:
        assert self.mesh is not None
        return ShardedLayout(self.mesh.world_size, self.mesh.rank, self.expert_parallel_size, self._expert_params())

    def _outer_meta(self) -> dict[str, Any]:
        assert self.mesh is not None
        return {
            "format_version": 1,
            "islands": self.mesh.islands,
            "round": self._round,
            "synced_island_steps": self.synced_island_steps,
            "round_start_step": self._round_start_step,
            "round_steps": self._round_steps,
            "final": self._final,
            "detectors": [d.state_dict() for d in self._detectors],
        }

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self.plan is None or not self._outer_ready:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]
        assert self.mesh is not None
        if not self._saving_now:
            self._pending.append(str(filepath))  # written at the next settle point, by every island (_settle)
            return
        ckpt = dict(checkpoint)
        state = dict(ckpt["state_dict"])
        for (name, _), s, b in zip(self._trainable(), self._synced, self._momentum):
            state[PREFIX_SYNCED + name] = s.clone()
            if self.outer_momentum > 0:
                state[PREFIX_MOMENTUM + name] = b.clone()
        ckpt["state_dict"] = state
        ckpt[META_KEY] = self._outer_meta()
        k = self.mesh.island_index
        if k == 0:  # P is valid only when every island's part is
            ckpt[EXTRA_FILES_KEY] = [
                f"{island_dir('', i).as_posix()}/{f}"
                for i in range(1, self.mesh.num_islands)
                for f in [META_FILE, *[shard_file_name(j, self._ep_of(i)) for j in range(self._ep_of(i))]]
            ]

        def save_file(obj: dict[str, Any], path: str) -> None:
            self.checkpoint_io.save_checkpoint(obj, path, storage_options=storage_options)

        names = self._optimizer_names() if "optimizer_states" in ckpt else []
        save_sharded(ckpt, island_dir(filepath, k), self._layout(), names, save_file)

    def remove_checkpoint(self, filepath: Any) -> None:
        if str(filepath) in self._pending:  # never written: ModelCheckpoint replaced it before the next sync
            self._pending.remove(str(filepath))
            return
        super().remove_checkpoint(filepath)  # type: ignore[misc]

    def _ep_of(self, island: int) -> int:
        assert self.mesh is not None
        return parse_expert_parallel_sizes(self._ep_config, self.mesh.num_islands)[island]

    def _write_pending(self, trainer: pl.Trainer) -> None:
        """Write the saves some island requested since the last sync, all islands to the same paths."""
        assert self.mesh is not None
        lists = all_gather_objects(self._pending if self.mesh.rank == 0 else [], self.mesh.outer_group)
        paths = next((p for p in lists if p), [])
        self._pending = []
        self._saving_now = True
        try:
            for path in paths:  # type: ignore[union-attr]
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                self.save_checkpoint(checkpoint, path)
                self.barrier("local_sgd.save")
        finally:
            self._saving_now = False

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        assert self.mesh is not None and self.plan is not None

        def load_file(path: str) -> dict[str, Any]:
            if weights_only is None:
                return self.checkpoint_io.load_checkpoint(path)
            return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)

        meta: dict[str, Any] | None = None
        if is_sharded_checkpoint(checkpoint_path):
            meta = load_file(str(Path(checkpoint_path) / META_FILE)).get(META_KEY)
        path = Path(checkpoint_path)
        if meta is not None:
            if meta["islands"] == self.mesh.islands:
                path = island_dir(checkpoint_path, self.mesh.island_index)
            else:
                rank_zero_warn(
                    f"local_sgd: {checkpoint_path} was saved with islands {meta['islands']}, this run has "
                    f"{self.mesh.islands}: every island resumes from island 0's weights and inner optimizer state "
                    "(the outer state is kept). Resume with the same islands to continue exactly."
                )
        expert_params = self._expert_params() if meta is not None else self.plan.expert_params
        ckpt = load_for_rank(path, expert_params, self._optimizer_names(), load_file)
        state = ckpt["state_dict"]
        self._loaded_outer = {k: state.pop(k) for k in list(state) if k.startswith(OUTER_PREFIX)}
        self._loaded_meta = meta
        return ckpt

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)  # type: ignore[misc]
        if not self._outer_ready:
            return
        named = self._trainable()
        meta = getattr(self, "_loaded_meta", None)
        with torch.no_grad():
            if meta is None:  # a checkpoint of another strategy: the loaded weights are the synchronised ones
                for (_, p), s in zip(named, self._synced):
                    s.copy_(p.detach())
                return
            for (name, _), s, b in zip(named, self._synced, self._momentum):
                s.copy_(self._loaded_outer[PREFIX_SYNCED + name])
                if self.outer_momentum > 0:
                    b.copy_(self._loaded_outer[PREFIX_MOMENTUM + name])
        for d, st in zip(self._detectors, meta["detectors"]):
            d.load_state_dict(st)
        self._round = int(meta["round"])
        self.synced_island_steps = int(meta.get("synced_island_steps", 0))
        if meta["islands"] == self.mesh.islands:  # type: ignore[union-attr]
            self._round_start_step = int(meta["round_start_step"])
            self._round_steps = int(meta["round_steps"])
            self._final = bool(meta["final"])
        self._loaded_outer = {}
