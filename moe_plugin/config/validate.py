"""Validate a composed config before building anything.

Errors name the config key, the bad value and the fix. Three kinds of checks:
1. keys with a `_target_` are checked against the target's constructor signature (unknown keys, simple
   types), recursively for nested kwargs classes declare in `NESTED_KWARGS`;
2. groups without a target against the dataclasses in schema.py;
3. cross-key rules (head counts, top-k, sequence length, layouts).
"""

from __future__ import annotations

import difflib
import inspect
import os
import types
import typing
from pathlib import Path
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
    head_dim = m.get("head_dim") or (hidden // heads if hidden and heads else None)
    if isinstance(head_dim, int) and (head_dim < 2 or head_dim % 2):
        key = "model.head_dim" if m.get("head_dim") else f"model.hidden_size/model.num_heads={hidden}/{heads}"
        raise ConfigError(
            f"{key}={head_dim} must be an even number >= 2: rotary position embeddings rotate pairs of channels. "
            "Set model.head_dim to an even value (e.g. 64) or change model.hidden_size/model.num_heads."
        )
    moe = m.get("moe") or {}
    e, k = moe.get("num_experts"), moe.get("top_k")
    if e is not None and k is not None and not 1 <= k <= e:
        raise ConfigError(f"model.moe.top_k={k} must be between 1 and model.moe.num_experts={e}.")


def _optim_rules(o: DictConfig) -> None:
    """Values the optimizer and schedule accept (torch and the schedule would fail much later, mid-setup)."""

    def number(key: str) -> float | None:
        v = o.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    lr, wd, eps = number("lr"), number("weight_decay"), number("eps")
    if lr is not None and not lr > 0:
        raise ConfigError(f"optim.lr={o.lr} must be a positive learning rate, e.g. optim.lr=1e-3.")
    if wd is not None and wd < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay} must be >= 0 (0 disables it).")
    if eps is not None and not eps > 0:
        raise ConfigError(f"optim.eps={o.eps} must be positive, e.g. optim.eps=1e-8.")
    betas = o.get("betas")
    if betas is not None and (
        len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ConfigError(f"optim.betas={list(betas)} must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.95].")
    for key in ("warmup_steps", "total_steps"):
        v = o.get(key)
        if isinstance(v, int) and v < (0 if key == "warmup_steps" else 1):
            raise ConfigError(f"optim.{key}={v} must be >= {0 if key == 'warmup_steps' else 1}.")
    ratio = number("min_lr_ratio")
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1] (the final LR / optim.lr).")


def _precision_choices() -> list[str]:
    from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    return [
        str(v)
        for t in (_PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS, _PRECISION_INPUT_INT)
        for v in typing.get_args(t)
    ]


def _trainer_rules(t: DictConfig) -> None:
    precision = t.get("precision")
    if precision is not None and str(precision) not in _precision_choices():
        raise ConfigError(
            f"trainer.precision={precision!r} is not a precision Lightning knows. Use one of 32-true, bf16-mixed, "
            "16-mixed, bf16-true, 16-true, 64-true."
        )
    steps = t.get("max_steps")
    if isinstance(steps, int) and steps < -1:
        raise ConfigError(f"trainer.max_steps={steps} must be -1 (no limit) or >= 0.")


def _path_rules(cfg: DictConfig) -> None:
    """Checkpoint paths named on the command line exist (found before anything is built, not at fit)."""
    ckpt = cfg.get("ckpt_path")
    if ckpt and not Path(expand_path(str(ckpt))).exists():
        raise ConfigError(
            f"ckpt_path={ckpt} does not exist. Give an existing checkpoint file or expert-parallel checkpoint "
            "folder, or drop ckpt_path (resume=auto continues from this run folder's newest checkpoint)."
        )
    resume = cfg.get("resume", "auto")
    if isinstance(resume, str) and resume not in ("auto", "never") and not Path(expand_path(resume)).exists():
        raise ConfigError(
            f"resume={resume!r}: no such file or folder. Use resume=auto, resume=never, or the path of a "
            "checkpoint or of a checkpoint folder."
        )


def expand_path(path: str) -> str:
    """`~` and environment variables expanded, as a user typing a path on a command line expects."""
    return os.path.expandvars(os.path.expanduser(path))


def _unknown_top_level_keys(cfg: DictConfig) -> None:
    """Top-level keys must be known: a TopConfig field or a config group (a folder of moe_plugin/conf, or a group
    of the caller's own Hydra tree). `+lr=1e-3` instead of `optim.lr=1e-3` must not be ignored silently."""
    from moe_plugin.config.schema import TopConfig

    known = set(TopConfig.__dataclass_fields__) | _config_groups()
    unknown = [str(k) for k in cfg if str(k) not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"{unknown[0]} is not a top-level config key.{hint} Top-level keys: {', '.join(sorted(TopConfig.__dataclass_fields__))}; "
            f"groups: {', '.join(sorted(_config_groups()))}. Fix the spelling, or set a group's key (e.g. optim.lr=...)."
        )


def _config_groups() -> set[str]:
    """Group names: the packaged conf/ folders plus the groups Hydra composed for this run (a user's own tree)."""
    import moe_plugin.conf

    root = Path(moe_plugin.conf.__file__).parent
    groups = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            groups |= {str(k).split("/")[0] for k in HydraConfig.get().runtime.choices}
    except Exception:  # not under Hydra
        pass
    return groups


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
    if "island_size" in strategy or "islands" in strategy:
        return _island_rules(cfg, strategy)
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
        es = strategy.get("expert_shard_size")
        check_layout(w, ep, [num_experts], shard, replicate if world is not None else None, es if world else None)
    except LayoutError as err:
        raise ConfigError(str(err)) from None


def _island_rules(cfg: DictConfig, strategy: DictConfig) -> None:
    """local_sgd: islands partition the world, and each island's EP fits its size and the experts."""
    from moe_plugin.parallel.islands import (
        check_islands,
        parse_expert_parallel_sizes,
        parse_inner_backends,
        parse_islands,
    )
    from moe_plugin.parallel.mesh import LayoutError

    world = _world_size(cfg)
    if world is None:
        return
    islands_cfg = strategy.get("islands")
    islands_list = OmegaConf.to_container(islands_cfg) if islands_cfg is not None else None
    ep = strategy.get("expert_parallel_size")
    ep = OmegaConf.to_container(ep) if isinstance(ep, ListConfig) else ep
    num_experts = ((cfg.get("model") or {}).get("moe") or {}).get("num_experts")
    try:
        islands = parse_islands(world, strategy.get("island_size") if islands_list is None else None, islands_list)
        check_islands(islands, parse_expert_parallel_sizes(ep, len(islands)), [num_experts] if num_experts else [])
        inner = strategy.get("inner_backend")
        parse_inner_backends(OmegaConf.to_container(inner) if isinstance(inner, ListConfig) else inner, len(islands))
    except LayoutError as err:
        raise ConfigError(str(err)) from None


def validate_config(cfg: DictConfig, optim_target: Any = None) -> None:
    """Raise ConfigError on the first problem found. Cheap: builds nothing.

    `optim_target` is the class whose keyword arguments the `optim` group holds (run() passes
    MoELanguageModule); config/ does not import lightning/, which depends on it.
    """
    from moe_plugin.config.schema import PathsConfig, TopConfig

    _unknown_top_level_keys(cfg)
    top = {k: cfg[k] for k in cfg if k in TopConfig.__dataclass_fields__}
    _check_schema(OmegaConf.create(top), "", TopConfig)
    _check_schema(cfg.get("paths"), "paths", PathsConfig)
    for key in ("model", "data", "callbacks", "logger", "checkpoint_io"):
        if cfg.get(key) is not None:
            check_target_kwargs(cfg[key], key)
    if cfg.get("optim") is not None:
        if optim_target is not None:
            _check_kwargs(cfg.optim, "optim", optim_target)
        _optim_rules(cfg.optim)
    if cfg.get("trainer") is not None:
        from lightning.pytorch import Trainer

        _check_kwargs(cfg.trainer, "trainer", Trainer)
        _trainer_rules(cfg.trainer)
    _path_rules(cfg)
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
