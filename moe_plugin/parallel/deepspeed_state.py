"""Per-parameter state of a DeepSpeed engine, by name: read for layout-free checkpoints, and written back.

Shapes: a parameter's "full" tensor is the tensor the module declares (for an expert parameter: this
rank's local experts [L, ...]); ZeRO holds it as fragments of flat fp32 partitions spread over the
parameter's data-parallel group (the world for dense parameters, the expert-data group for experts).

DeepSpeed's tensor-fragment API does the gathering and scattering (deepspeed.utils):

    safe_get_full_fp32_param(p)            fp32 master weight of p, assembled over p's group
    safe_get_full_optimizer_state(p, k)    optimizer state k (exp_avg, exp_avg_sq, ...) of p, assembled
    safe_set_full_fp32_param(p, v)         this rank's fragment of the master weight <- v

These are collective over p's group: every rank calls them for every parameter in the same order.
Optimizer state is created lazily by the base optimizer's first step; to restore it before that,
`set_state` builds the flat state tensors from per-parameter fragments with DeepSpeed's own
`map_to_flat_opt_states` (what DeepSpeed's universal-checkpoint loader does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_state_keys(optimizer: Any) -> list[str]:
    """Per-parameter state keys the base optimizer has created (empty before its first step)."""
    keys: list[str] = []
    for st in _base_optimizer(optimizer).state.values():
        keys += [k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0 and k not in keys]
    return keys


def optimizer_step_count(optimizer: Any) -> float | None:
    """The base optimizer's step counter (equal for every flat partition), None before the first step."""
    for st in _base_optimizer(optimizer).state.values():
        if "step" in st:
            return float(st["step"])
    return None


def get_state(
    module: nn.Module, optimizer: Any
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], float | None]:
    """(fp32 weights by name, optimizer state by name, step) of the trainable parameters. Collective."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    keys = optimizer_state_keys(optimizer) if optimizer is not None else []
    if keys and hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link per-parameter views of the flat state once, after the FIRST group's first step, so
        # groups stepped after it keep no views (DeepSpeed 0.19): link again now that every group has state
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    weights: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p)
        weights[name] = (full if full is not None else p.detach()).detach().float().cpu().clone()
        if keys:
            states[name] = {k: safe_get_full_optimizer_state(p, k).detach().float().cpu().clone() for k in keys}
    return weights, states, optimizer_step_count(optimizer) if optimizer is not None else None


@torch.no_grad()
def copy_master_weights_to_model(module: nn.Module) -> None:
    """ZeRO-1/2: model parameters <- their fp32 master weights (collective over each parameter's group).

    DeepSpeed's own loader restores the fp32 partitions from the ZeRO files but the model's parameters from the
    model-states file, which holds no expert weights unless the experts are DeepSpeed's own MoE classes (their
    weights go to per-expert files). Our experts would keep their initial values until the first step copies the
    partitions back, so the first resumed forward would be wrong: copy them now.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    for p in module.parameters():
        if p.requires_grad and not hasattr(p, "ds_id"):
            full = safe_get_full_fp32_param(p)
            if full is not None:
                p.data.copy_(full.to(p.dtype).view_as(p))


def _stage3_set_local(p: nn.Parameter, value: torch.Tensor) -> None:
    """ZeRO-3: this rank's partition of the working (low-precision) copy <- the matching slice of `value`."""
    import torch.distributed as dist

    part = p.ds_tensor  # type: ignore[attr-defined]
    rank = dist.get_rank(group=p.ds_process_group)  # type: ignore[attr-defined]
    flat = value.reshape(-1).to(part.dtype)
    start = rank * part.numel()
    n = max(0, min(part.numel(), flat.numel() - start))
    if n:
        part.data.reshape(-1)[:n].copy_(flat[start : start + n])


@torch.no_grad()
def set_weights(module: nn.Module, weights: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Model parameters and fp32 master weights <- `weights` (full tensors by name). Collective-free."""
    from deepspeed.utils import safe_set_full_fp32_param

    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if strict and missing:
        raise KeyError(f"the checkpoint has no value for parameters {missing[:5]}: resume with the same model.")
    for name, p in params.items():
        if name not in weights:
            continue
        value = weights[name]
        if hasattr(p, "ds_id"):  # ZeRO-3: partitioned; p.ds_shape is the declared shape
            if tuple(value.shape) != tuple(p.ds_shape):  # type: ignore[attr-defined]
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)}, model {tuple(p.ds_shape)}.")  # type: ignore[attr-defined]
            _stage3_set_local(p, value)
        else:
            if value.shape != p.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)}, model {tuple(p.shape)}.")
            p.data.copy_(value.to(p.dtype))
        if p.requires_grad:
            safe_set_full_fp32_param(p, value.to(torch.float32).to(p.device))


@torch.no_grad()
def set_optimizer_state(
    module: nn.Module, optimizer: Any, states: dict[str, dict[str, torch.Tensor]], step: float | None
) -> None:
    """Optimizer state of every trainable parameter <- `states` (full tensors by name), and the step count."""
    from deepspeed.utils import safe_set_full_optimizer_state
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing = [n for n in params if n not in states]
    if missing:
        raise KeyError(
            f"the checkpoint has no optimizer state for {missing[:5]}: resume with the same model/optimizer."
        )
    base = _base_optimizer(optimizer)
    keys = sorted({k for st in states.values() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0})
    if hasattr(optimizer, "bit16_groups"):  # ZeRO-1/2: flat fp32 partition per group, fragments per parameter
        for i, group in enumerate(base.param_groups):
            flat = optimizer.single_partition_of_fp32_groups[i]
            lps = optimizer.bit16_groups[i]
            names = {id(p): n for n, p in params.items()}
            for lp in lps:
                mapping = getattr(lp, "_hp_mapping", None)
                if mapping is None:
                    continue
                addr = mapping.lp_fragment_address
                full = states[names[id(lp)]]
                mapping.optim_fragment = {
                    k: full[k].reshape(-1).narrow(0, addr.start, addr.numel).to(flat.device, flat.dtype) for k in keys
                }
            map_to_flat_opt_states(flat, lps, base.state, keys)
            if step is not None:
                base.state[flat]["step"] = torch.tensor(step, dtype=torch.float32)
            assert group["params"][0] is flat
        optimizer._hp_optimizer_states_linked = True
        return
    # ZeRO-3: one flat fp32 partition per sub-group (optimizer.fp32_partitioned_groups_flat); the base optimizer
    # creates its state for them lazily at its first step (DeepSpeed 0.19), so create the flat state tensors
    # first, then write each parameter's partition of them (safe_set_full_optimizer_state)
    for flat in optimizer.fp32_partitioned_groups_flat:
        st = base.state[flat]
        for k in keys:
            if k not in st:
                st[k] = torch.zeros_like(flat)
    for name, p in params.items():
        for k in keys:
            safe_set_full_optimizer_state(p, states[name][k].to(torch.float32).to(p.device), k)
    if step is not None:
        for st in base.state.values():
            st["step"] = torch.tensor(step, dtype=torch.float32)
