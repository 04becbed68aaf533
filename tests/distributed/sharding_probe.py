"""A callback the sharded-precision tests add to `python train.py`: what FSDP2 really did on rank 0.

Written once, after the first optimizer step, to `path` (JSON):
    param_dtypes    dtypes of the sharded (master) parameters
    compute_dtypes  dtypes of the weights a dense linear and the routed experts see inside forward
    compute_sharded whether those weights were still DTensor shards inside forward (False: all-gathered)
    grad_dtypes     dtypes of the sharded gradients after backward (the reduce-scatter's output)
    optim_dtypes    dtypes of AdamW's moments
    policies        per FSDP module: its offload policy class, mixed precision param / reduce dtypes
    devices         devices of the sharded parameters, gradients and optimizer state
"""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
import torch
from torch.distributed.fsdp import FSDPModule

from moe_plugin.layers.moe import moe_layers


def _names(values: Any) -> list[str]:
    return sorted({str(v) for v in values})


class ShardingProbe(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: dict[str, Any] = {"compute_dtypes": set(), "compute_sharded": set()}
        self.handles: list[Any] = []
        self.done = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        experts = moe_layers(pl_module)[0].experts
        linear = next(m for m in pl_module.modules() if isinstance(m, torch.nn.Linear))

        def hook(module: torch.nn.Module, args: Any) -> None:
            # FSDP2's pre-forward hook ran first (registered at fully_shard time): the unsharded weights are set
            for p in module.parameters(recurse=False):
                self.seen["compute_dtypes"].add(p.dtype)
                self.seen["compute_sharded"].add(hasattr(p, "to_local"))

        self.handles = [experts.register_forward_pre_hook(hook), linear.register_forward_pre_hook(hook)]

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "grad_dtypes" not in self.seen:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.seen["grad_dtypes"] = _names(g.dtype for g in grads)
            self.seen["grad_sharded"] = all(hasattr(g, "to_local") for g in grads)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.done:
            return
        self.done = True
        for h in self.handles:
            h.remove()
        params = list(pl_module.parameters())
        opt = trainer.optimizers[0]
        moments = [v for p in params for k, v in opt.state[p].items() if k in ("exp_avg", "exp_avg_sq")]
        policies = []
        for m in pl_module.modules():
            if isinstance(m, FSDPModule):
                group = m._get_fsdp_state()._fsdp_param_group  # private: no public getter for the policies
                if group is not None:
                    mp = group.mp_policy
                    policies.append([type(group.offload_policy).__name__, str(mp.param_dtype), str(mp.reduce_dtype)])
        out = {
            "param_dtypes": _names(p.dtype for p in params),
            "params_sharded": all(hasattr(p, "to_local") for p in params),
            "compute_dtypes": _names(self.seen["compute_dtypes"]),
            "compute_sharded": sorted(self.seen["compute_sharded"]),
            "grad_dtypes": self.seen.get("grad_dtypes"),
            "grad_sharded": self.seen.get("grad_sharded"),
            "optim_dtypes": _names(v.dtype for v in moments),
            "policies": sorted({tuple(p) for p in policies}),
            "devices": _names(t.device.type for t in [*params, *moments]),
        }
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump(out, f)
