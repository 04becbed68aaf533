"""Validate a composed config before building anything.

Errors name the config key, the bad value and the fix. Three kinds of checks:
1. keys with a `_target_` are checked against the target's constructor signature (unknown keys, simple
   types), recursively for nested kwargs classes declare in `NESTED_KWARGS`;
2. groups without a target against the dataclasses in schema.py;
3. cross-key rules (head counts, top-k, sequence length, layouts).
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from moe_plugin.errors import ConfigError

__all__ = ["ConfigError", "check_target_kwargs", "validate_config"]


def _signature_params(target: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(target).parameters)


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty or value is None or isinstance(annotation, str):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    if origin is dict or annotation is dict:
        return isinstance(value, (dict, DictConfig))
    return True


def check_target_kwargs(node: Any, key: str) -> None:
    """Recursively check every `_target_` node under `node` (at config path `key`)."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_target_kwargs(item, f"{key}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    target_name = node.get("_target_")
    if target_name is None:
        for k in node:
            try:
                child = node[k]
            except InterpolationResolutionError:
                continue
            check_target_kwargs(child, f"{key}.{k}" if key else str(k))
        return
    from hydra.utils import get_object

    try:
        target = get_object(target_name)
    except Exception as err:
        raise ConfigError(
            f"{key}._target_={target_name!r} cannot be imported ({type(err).__name__}: {err}). "
            "Check the spelling of the class path or install the package that provides it."
        ) from err
    _check_kwargs(node, key, target)


def _check_kwargs(node: DictConfig, key: str, target: Any) -> None:
    params = _signature_params(target)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:
        hints = {}
    nested = getattr(target, "NESTED_KWARGS", {})
    for k in node:
        k = str(k)
        if k.startswith("_"):
            continue
        if k not in params and not accepts_any:
            valid = ", ".join(p for p in params if p not in ("self", "args", "kwargs"))
            raise ConfigError(
                f"{key}.{k} is not an option of {getattr(target, '__qualname__', target)}. Valid keys: {valid}. "
                f"Remove it or fix its spelling."
            )
        if OmegaConf.is_missing(node, k):
            raise ConfigError(f"{key}.{k} is required (it is '???'). Set it on the command line: {key}.{k}=VALUE.")
        try:
            value = node[k]
        except InterpolationResolutionError:
            continue  # resolved only inside a run (e.g. ${hydra:runtime.output_dir}); nothing to check here
        if k in nested and isinstance(node[k], DictConfig):
            _check_kwargs(node[k], f"{key}.{k}", nested[k])
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            check_target_kwargs(value, f"{key}.{k}")
            continue
        if k in hints and not _type_ok(value, hints[k]):
            raise ConfigError(
                f"{key}.{k}={value!r} has the wrong type: {target.__qualname__} expects {hints[k]}. "
                f"Set {key}.{k} to a value of that type."
            )


def _check_schema(node: Any, key: str, schema: type) -> None:
    if node is None:
        return
    try:
        OmegaConf.merge(OmegaConf.structured(schema), node)
    except Exception as err:
        msg = str(err).splitlines()[0]
        full_key = getattr(err, "full_key", None)
        where = f"{key}.{full_key}" if key and full_key else (full_key or key)
        raise ConfigError(f"{where}: {msg}. Fix the value or remove the key.") from err


def _model_rules(m: DictConfig) -> None:
    hidden, heads = m.get("hidden_size"), m.get("num_heads")
    kv = m.get("num_kv_heads") or heads
    if hidden and heads and not m.get("head_dim") and hidden % heads:
        raise ConfigError(
            f"model.hidden_size={hidden} is not divisible by model.num_heads={heads}. "
            "Set model.head_dim explicitly or pick a divisible head count."
        )
    if heads and kv and heads % kv:
        raise ConfigError(
            f"model.num_heads={heads} is not a multiple of model.num_kv_heads={kv}. "
            "Pick num_kv_heads dividing num_heads (GQA groups)."
        )
    if m.get("activation_checkpointing") is not None:
        from moe_plugin.parallel.recompute import check_activation_checkpointing

        try:
            check_activation_checkpointing(
                m.get("activation_checkpointing"),
                m.get("activation_checkpointing_target", "blocks"),
                m.get("activation_checkpointing_every", 1),
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
    moe = m.get("moe") or {}
    e, k = moe.get("num_experts"), moe.get("top_k")
    if e is not None and k is not None and not 1 <= k <= e:
        raise ConfigError(f"model.moe.top_k={k} must be between 1 and model.moe.num_experts={e}.")


def _world_size(cfg: DictConfig) -> int | None:
    """trainer.devices x trainer.num_nodes when both are known numbers (None for "auto", -1, ...)."""
    trainer = cfg.get("trainer") or {}
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if isinstance(devices, (list, ListConfig)):
        devices = len(devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1 or not isinstance(nodes, int):
        return None
    return devices * nodes


def _layout_rules(cfg: DictConfig) -> None:
    """Expert-parallel layout (strategy.expert_parallel_size vs world size and experts), before any launch."""
    import os

    strategy = cfg.get("strategy")
    ep = strategy.get("expert_parallel_size") if isinstance(strategy, DictConfig) else None
    ckpt = cfg.get("ckpt_path")
    if ckpt and os.path.isdir(str(ckpt)) and ep is None:
        raise ConfigError(
            f"ckpt_path={ckpt} is a sharded expert-parallel checkpoint (a directory), which strategy "
            f"{strategy.get('name', strategy.get('_target_')) if strategy else None!r} cannot load. Resume with "
            "strategy=expert_parallel (any strategy.expert_parallel_size, trainer.devices=1 works), or convert it "
            "first: moe-plugin ckpt consolidate PATH OUT.ckpt, then ckpt_path=OUT.ckpt."
        )
    if ep is None:
        return
    if not isinstance(ep, int) or isinstance(ep, bool):
        raise ConfigError(f"strategy.expert_parallel_size={ep!r} must be an integer >= 1.")
    from moe_plugin.parallel.mesh import LayoutError, check_layout

    moe = (cfg.get("model") or {}).get("moe") or {}
    num_experts = moe.get("num_experts")
    if num_experts is None:  # the MoE layer's default
        import inspect as _inspect

        from moe_plugin.layers.moe import MoE

        num_experts = _inspect.signature(MoE).parameters["num_experts"].default
    world = _world_size(cfg)
    shard = strategy.get("data_parallel_shard_size", 1)
    replicate = strategy.get("data_parallel_replicate_size")
    if not isinstance(shard, int) or isinstance(shard, bool):
        raise ConfigError(f"strategy.data_parallel_shard_size={shard!r} must be an integer >= 1.")
    try:
        w = world if world is not None else max(ep, shard)
        check_layout(w, ep, [num_experts], shard, replicate if world is not None else None)
    except LayoutError as err:
        raise ConfigError(str(err)) from None


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first problem found. Cheap: builds nothing."""
    from moe_plugin.config.schema import PathsConfig, TopConfig

    top = {k: cfg[k] for k in cfg if k in TopConfig.__dataclass_fields__}
    _check_schema(OmegaConf.create(top), "", TopConfig)
    _check_schema(cfg.get("paths"), "paths", PathsConfig)
    for key in ("model", "data", "callbacks", "logger", "checkpoint_io"):
        if cfg.get(key) is not None:
            check_target_kwargs(cfg[key], key)
    if cfg.get("optim") is not None:
        from moe_plugin.lightning.module import MoELanguageModule

        _check_kwargs(cfg.optim, "optim", MoELanguageModule)
    if cfg.get("trainer") is not None:
        from lightning.pytorch import Trainer

        _check_kwargs(cfg.trainer, "trainer", Trainer)
    if cfg.get("model") is not None:
        _model_rules(cfg.model)
    seq_len, max_seq = cfg.get("data", {}).get("seq_len"), cfg.get("model", {}).get("max_seq_len")
    if seq_len and max_seq and seq_len > max_seq:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds model.max_seq_len={max_seq}. Lower data.seq_len or raise model.max_seq_len."
        )
    for key in ("accelerator", "strategy"):
        node = cfg.get(key)
        if node is not None and not isinstance(node, DictConfig):
            raise ConfigError(f"{key}={node!r} must be a config group choice like {key}=cpu, not a bare value.")
    if isinstance(cfg.get("accelerator"), DictConfig):
        # Fail fast, before any data or model is built, when the requested vendor is absent.
        from moe_plugin.accelerators import select_vendor

        try:
            select_vendor(cfg.accelerator.get("name", "auto"))
        except (RuntimeError, ValueError) as err:
            raise ConfigError(str(err)) from None
    if isinstance(cfg.get("hardware"), DictConfig):
        from moe_plugin.accelerators.catalog import check_hardware_config

        try:
            check_hardware_config(OmegaConf.to_container(cfg.hardware, resolve=True))  # type: ignore[arg-type]
        except ValueError as err:
            raise ConfigError(str(err)) from None
    _layout_rules(cfg)
