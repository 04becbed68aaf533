"""A DeepSpeed checkpoint directory from a layout-free checkpoint, written by DeepSpeed's own engine.

Vocabulary: W world size, EP expert-parallel size, S ZeRO stage of the TARGET run; E global experts of a
layer, [start, stop) the local experts of a rank (parallel/mesh.py).

Why the engine and not a file writer: a ZeRO checkpoint is DeepSpeed's partition layout (flat groups aligned
to 2*W values, padding on the last partition, per-parameter fragment addresses, loss-scaler objects, the
base optimizer's state_dict); writing those files by hand would re-implement DeepSpeed and break with its
next release. So `export_deepspeed_checkpoint` starts W processes (gloo, DeepSpeed's CPU accelerator unless
DS_ACCELERATOR says otherwise) that each build the target layout exactly as strategy=deepspeed_ep does

    DeepSpeed's expert groups -> our mesh (deepspeed_groups.build_deepspeed_expert_mesh)
    apply_expert_parallel (this rank's experts), mark_expert_parameters, the optimizer's groups as
    configure_optimizers made them, split into DeepSpeed's MoE groups, initialize_expert_parallel_engine

then set every parameter's fp32 master weight and optimizer state by name (deepspeed_state.set_weights /
set_optimizer_state: the code deepspeed_ep resumes with; experts sliced [start:stop] from the global [E, ...]
tensors) and call `engine.save_checkpoint(out, tag="checkpoint", client_state=...)` with Lightning's client
state (the checkpoint dict without weights and optimizer state, as Lightning's DeepSpeedStrategy writes it)
plus deepspeed_ep's layout record. The directory is therefore what deepspeed_ep would have written at that
layout, by construction; convert/deepspeed_checkpoint.py reads it back.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

RECORD_FORMAT_VERSION = 1


class _Holder(nn.Module):
    """Gives the model the parameter names a LightningModule gives it ("model.<name>")."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _optimizer(groups: list[dict[str, Any]], kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"])
    return torch.optim.AdamW(groups, lr=groups[0]["lr"])


def _export_rank(
    rank: int,
    world: int,
    port: int,
    expert_parallel_size: int,
    stage: int,
    build_model: Callable[[], nn.Module],
    names: list[list[str]],
    plain: dict[str, Any],
    out: str,
    timeout_seconds: float,
) -> None:
    """One rank of the export (started by torch.multiprocessing; see the module docstring)."""
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
        }
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from moe_plugin.convert.deepspeed_checkpoint import RECORD_KEY
    from moe_plugin.parallel.apply import apply_expert_parallel
    from moe_plugin.parallel.deepspeed_engine import initialize_expert_parallel_engine
    from moe_plugin.parallel.deepspeed_groups import (
        build_deepspeed_expert_mesh,
        mark_expert_parameters,
        regroup_scheduler_state,
        split_moe_param_groups,
    )
    from moe_plugin.parallel.deepspeed_state import set_optimizer_state, set_weights

    deepspeed.init_distributed("gloo", auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_seconds))
    try:
        mesh = build_deepspeed_expert_mesh(expert_parallel_size)
        holder = _Holder(build_model())
        plan = apply_expert_parallel(holder, mesh, reduce_router_counts=True)
        mark_expert_parameters(holder, plan.expert_params, expert_parallel_size, stage)
        params = dict(holder.named_parameters())
        osd = plain["optimizer_states"][0]
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
        kind = "adamw" if "betas" in hyper[0] else "sgd"
        optimizer = _optimizer([{**h, "params": [params[n] for n in g]} for h, g in zip(hyper, names)], kind)
        origin = split_moe_param_groups(optimizer, None)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
        }
        engine, ds_optimizer = initialize_expert_parallel_engine(holder, config, optimizer, None, rank)

        def local(name: str, t: torch.Tensor) -> torch.Tensor:
            if name in plan.expert_params:  # global [E, ...] -> this rank's experts [L, ...]
                _, start, stop = plan.expert_params[name]
                return t[start:stop]
            return t

        state_dict = plain["state_dict"]
        set_weights(holder, {n: local(n, state_dict[n]) for n in params})
        buffers = {n for n, _ in holder.named_buffers()}
        holder.load_state_dict({n: v for n, v in state_dict.items() if n in buffers}, strict=False)
        flat = [n for g in names for n in g]
        states: dict[str, dict[str, torch.Tensor]] = {}
        step: float | None = None
        for i, st in osd["state"].items():
            name = flat[int(i)]
            states[name] = {k: local(name, v) for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
            if "step" in st:
                step = float(st["step"])
        if states:
            set_optimizer_state(holder, ds_optimizer, states, step)
        client = {k: v for k, v in plain.items() if k not in ("state_dict", "optimizer_states")}
        client["lr_schedulers"] = [
            regroup_scheduler_state(s, origin, to_original=False) for s in plain.get("lr_schedulers", [])
        ]
        client[RECORD_KEY] = {
            "format_version": RECORD_FORMAT_VERSION,
            "zero_stage": stage,
            "world_size": world,
            "expert_parallel_size": expert_parallel_size,
            "expert_params": {n: e for n, (e, _, _) in plan.expert_params.items()},
            "original_names": names,
            "original_hyperparameters": hyper,
            "group_origin": origin,
        }
        engine.save_checkpoint(out, tag="checkpoint", client_state=client)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def export_deepspeed_checkpoint(
    plain: dict[str, Any],
    out: str | os.PathLike[str],
    build_model: Callable[[], nn.Module],
    names: list[list[str]],
    world_size: int,
    expert_parallel_size: int,
    stage: int,
    timeout_seconds: float = 600.0,
) -> None:
    """Write DeepSpeed's checkpoint directory for (W, EP, ZeRO stage) from a plain checkpoint dict.

    plain: a plain Lightning checkpoint (every expert [E, ...], torch optimizer state keyed by the ids of
        `names`), e.g. a consolidated layout-free checkpoint. names: parameter names per optimizer group,
        in configure_optimizers' order. build_model: builds the model (picklable; each rank calls it).
    Starts `world_size` local processes; each holds the plain dict (the converter is an offline tool).
    """
    import torch.multiprocessing as mp

    from moe_plugin.parallel.mesh import check_layout

    if stage not in (1, 2):
        raise ValueError(
            f"--stage {stage}: DeepSpeed directories are written (and read back) for ZeRO stages 1 and 2. At ZeRO-3 "
            "keep the layout-free checkpoint: strategy=deepspeed_ep strategy.stage=3 resumes it directly."
        )
    check_layout(world_size, expert_parallel_size)
    if not plain.get("optimizer_states"):
        raise ValueError("the checkpoint has no optimizer state (saved with save_weights_only?): nothing to resume.")
    Path(out).mkdir(parents=True, exist_ok=True)
    args = (world_size, _free_port(), expert_parallel_size, stage, build_model, names, plain, str(out), timeout_seconds)
    mp.start_processes(_export_rank, args=args, nprocs=world_size, join=True, start_method="spawn")


__all__ = ["export_deepspeed_checkpoint"]
