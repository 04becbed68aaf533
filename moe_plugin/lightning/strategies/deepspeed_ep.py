"""DeepSpeedExpertParallelStrategy: DeepSpeed ZeRO plus our expert parallelism, registered as "deepspeed_ep".

    python train.py strategy=deepspeed_ep strategy.stage=2 strategy.expert_parallel_size=2 trainer.devices=2
    Trainer(strategy=DeepSpeedExpertParallelStrategy(stage=3, expert_parallel_size=2), devices=4)
    Trainer(strategy="deepspeed_ep", ...)                       # ZeRO-2, EP=1
    python train.py strategy=deepspeed_ep strategy.config=ds_config.json   # a DeepSpeed JSON or YAML config

Built on Lightning's DeepSpeedStrategy and DeepSpeed's own engine (ZeRO 1/2/3, offload, precision,
clipping, accumulation are DeepSpeed's). What it changes, in the order Lightning calls it:

- __init__: DeepSpeed picks its accelerator when it is imported, so our vendor layer sets DS_ACCELERATOR
  first (accelerators/deepspeed_accelerator.py; a DS_ACCELERATOR the user set is respected and checked).
- setup_environment: no CUDA-only check (Lightning's refuses anything else); the layout is checked before
  any rank waits; deepspeed.init_distributed with the vendor's backend; then ONE set of expert groups,
  created by DeepSpeed (deepspeed.utils.groups) and handed to our mesh (parallel/deepspeed_groups.py).
- setup: apply_expert_parallel (local experts + AllToAllDispatcher on those groups), expert parameters
  marked as DeepSpeed MoE parameters, the optimizer's groups split into dense and MoE groups, then
  DeepSpeed's engine (parallel/deepspeed_engine.py: DeepSpeedEngine with its expert handling on for our
  layers). ZeRO then reduces and partitions experts over the expert-data-parallel group with our rule:
  grad(phi) = (1/W) sum over replicas (equality tests: same losses as one process).
- checkpoints (strategy.checkpoint_format):
    moe_plugin (default)  the layout-free sharded directory of parallel/checkpoint.py, written from
                          DeepSpeed's fp32 master weights and optimizer state by parameter name
                          (deepspeed.utils.safe_get_full_*); resumable by deepspeed_ep or expert_parallel
                          at any EP/world size and ZeRO stage.
    deepspeed             DeepSpeed's own checkpoint directory (engine.save_checkpoint: ZeRO-1/2 shards per rank,
                          resumed by DeepSpeed's own loader at the same layout, by name at any other;
                          `moe-plugin ckpt convert` turns it into the layout-free format and back,
                          convert/deepspeed_checkpoint.py).
  Loading accepts either kind whatever checkpoint_format says.
- reliability: a loss-spike guard's rejected update is skipped through DeepSpeed's overflow path
  (parallel/deepspeed_engine.skip_next_step).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.strategies.deepspeed import DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from moe_plugin.layers.moe import moe_layers
from moe_plugin.parallel.apply import ExpertParallelPlan, apply_expert_parallel
from moe_plugin.parallel.deepspeed_groups import regroup_scheduler_state, torch_optimizer_state
from moe_plugin.parallel.mesh import ExpertParallelMesh, check_layout

log = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("moe_plugin", "deepspeed")


def _preselect_deepspeed_accelerator() -> None:
    """Set DS_ACCELERATOR from our vendor detection before deepspeed is imported (it decides on import)."""
    import sys

    from moe_plugin.accelerators.deepspeed_accelerator import ENV, deepspeed_accelerator_name

    if ENV in os.environ or "deepspeed" in sys.modules:
        return  # the user's choice, or DeepSpeed has chosen: checked against the Trainer's device in setup
    from moe_plugin.accelerators.detect import detected

    try:
        os.environ[ENV] = deepspeed_accelerator_name(detected().primary.profile.device_type)
    except RuntimeError:
        pass  # no DeepSpeed accelerator for the detected vendor: setup_environment raises the clear error


def load_deepspeed_config(config: str | os.PathLike[str] | dict[str, Any] | None) -> dict[str, Any] | None:
    """A DeepSpeed config from a dict, a JSON file or a YAML file (Lightning reads JSON only)."""
    if config is None or isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise ValueError(f"strategy.config={str(config)!r}: no such file. Pass a DeepSpeed JSON or YAML config file.")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"strategy.config={str(config)!r} does not hold a mapping (a DeepSpeed config object).")
    return data


class DeepSpeedExpertParallelStrategy(DeepSpeedStrategy):
    strategy_name = "deepspeed_ep"

    def __init__(
        self,
        expert_parallel_size: int = 1,
        stage: int = 2,
        offload_optimizer: bool = False,
        config: str | os.PathLike[str] | dict[str, Any] | None = None,
        process_group_backend: str | None = None,
        timeout_seconds: float = 1800.0,
        reduce_router_counts: bool = True,
        checkpoint_format: str = "moe_plugin",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            expert_parallel_size: EP, ranks each layer's experts are split over (same meaning as expert_parallel).
            stage: ZeRO stage 1 (optimizer state partitioned), 2 (+ gradients) or 3 (+ parameters).
            offload_optimizer: keep optimizer state and its step on the CPU (DeepSpeed ZeRO-Offload).
            config: a DeepSpeed config (dict, JSON or YAML path); replaces stage/offload_optimizer and the
                other DeepSpeed arguments, as in Lightning's DeepSpeedStrategy.
            process_group_backend: override the collective backend (default: from the device's vendor).
            timeout_seconds: how long a collective waits for a peer before raising.
            reduce_router_counts: balance loss and load statistics over the global micro-batch (see
                expert_parallel).
            checkpoint_format: "moe_plugin" (layout-free, any EP/engine) or "deepspeed" (DeepSpeed's directory).
            kwargs: any other argument of Lightning's DeepSpeedStrategy (offload_parameters, allgather_bucket_size, ...).
        """
        if int(expert_parallel_size) < 1:
            raise ValueError(f"strategy.expert_parallel_size={expert_parallel_size} must be >= 1.")
        if timeout_seconds <= 0:
            raise ValueError(f"strategy.timeout_seconds={timeout_seconds} must be > 0 (seconds).")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"strategy.checkpoint_format={checkpoint_format!r}: choose one of {', '.join(CHECKPOINT_FORMATS)}."
            )
        loaded = load_deepspeed_config(config)
        zero_stage = stage if loaded is None else (loaded.get("zero_optimization") or {}).get("stage", 0)
        where = "strategy.stage" if loaded is None else "zero_optimization.stage of strategy.config"
        if zero_stage not in (1, 2, 3):
            raise ValueError(
                f"{where}={zero_stage}: deepspeed_ep runs ZeRO stages 1, 2 or 3. For no ZeRO use "
                "strategy=expert_parallel (plain data parallel for the dense part)."
            )
        if checkpoint_format == "deepspeed" and zero_stage == 3:  # refused now, not at the first checkpoint
            raise ValueError(
                f"strategy.checkpoint_format=deepspeed with {where}=3: DeepSpeed directories are written and read for "
                "ZeRO-1/2 only. Use strategy.checkpoint_format=moe_plugin (layout-free; it resumes at any stage)."
            )
        _preselect_deepspeed_accelerator()
        super().__init__(
            stage=stage,
            offload_optimizer=offload_optimizer,
            config=loaded,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=timeout_seconds),
            **kwargs,
        )
        self.expert_parallel_size = int(expert_parallel_size)
        self.timeout_seconds = timeout_seconds
        self.reduce_router_counts = reduce_router_counts
        self.checkpoint_format = checkpoint_format
        self.mesh: ExpertParallelMesh | None = None
        self.plan: ExpertParallelPlan | None = None
        self.group_origin: list[int] = []  # optimizer group after the MoE split -> group configure_optimizers made

    @property
    def zero_stage(self) -> int:
        assert isinstance(self.config, dict)
        return int((self.config.get("zero_optimization") or {}).get("stage", 0))

    # ------------------------------------------------------------------------------------ set-up
    def _get_process_group_backend(self) -> str:
        from moe_plugin.accelerators.profiles import default_backend

        return self._process_group_backend or default_backend(self.root_device.type)

    def setup_environment(self) -> None:
        from moe_plugin.accelerators.deepspeed_accelerator import select_deepspeed_accelerator
        from moe_plugin.parallel.deepspeed_groups import build_deepspeed_expert_mesh

        select_deepspeed_accelerator(self.root_device.type)
        world = self.num_nodes * self.num_processes
        module = self.lightning_module
        num_experts = [m.num_experts for m in moe_layers(module)] if module is not None else []
        check_layout(world, self.expert_parallel_size, num_experts)  # before any rank waits on another
        DDPStrategy.setup_environment(self)  # Lightning's DeepSpeedStrategy refuses non-CUDA accelerators here
        if self.mesh is None:
            self.mesh = build_deepspeed_expert_mesh(self.expert_parallel_size)
            rank_zero_info(f"deepspeed_ep: ZeRO-{self.zero_stage}, {self.mesh} backend={self._process_group_backend}")

    def setup_distributed(self) -> None:
        from lightning.fabric.strategies.deepspeed import _validate_device_index_selection
        from lightning.fabric.utilities.seed import reset_seed

        assert self.parallel_devices is not None
        if all(d.index is not None for d in self.parallel_devices):  # CPU devices have no index to check
            _validate_device_index_selection(self.parallel_devices)
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def setup(self, trainer: pl.Trainer) -> None:
        from moe_plugin.parallel.deepspeed_groups import mark_expert_parameters

        module = self.lightning_module
        assert module is not None and self.mesh is not None
        self.plan = apply_expert_parallel(module, self.mesh, self.reduce_router_counts)
        mark_expert_parameters(module, self.plan.expert_params, self.expert_parallel_size, self.zero_stage)
        super().setup(trainer)
        self._skip_rejected_updates()

    def _skip_rejected_updates(self) -> None:
        """Skip the optimizer update when a loss-spike guard rejects it, through DeepSpeed's overflow path.

        The guard skips an update by dropping `.grad` before the optimizer step; DeepSpeed's engine steps from
        its own (partitioned) gradient buffers, so instead the ZeRO optimizer is told to take its overflow-skip
        path for this step (parallel/deepspeed_engine.skip_next_step): no update, gradients cleared, Adam's step
        count unchanged, the same as a torch optimizer with no gradients. Runs after the on_before_optimizer_step
        hooks (where the guard decides) and before engine.step().
        """
        plugin = self.precision_plugin
        if getattr(plugin, "_moe_plugin_skips_rejected", False):
            return
        after_closure = plugin._after_closure

        def checked(model: Any, optimizer: Any) -> None:
            after_closure(model, optimizer)
            from moe_plugin.lightning.callbacks.spike import update_rejected
            from moe_plugin.parallel.deepspeed_engine import skip_next_step

            if update_rejected(model.trainer):
                skip_next_step(self.deepspeed_engine.optimizer)

        plugin._after_closure = checked  # type: ignore[method-assign]
        plugin._moe_plugin_skips_rejected = True  # type: ignore[attr-defined]

    def _init_optimizers(self) -> Any:
        from moe_plugin.parallel.deepspeed_groups import split_moe_param_groups

        optimizer, scheduler_config = super()._init_optimizers()
        scheduler = scheduler_config.scheduler if scheduler_config is not None else None
        self._original_groups = [[*g["params"]] for g in optimizer.param_groups]
        self.group_origin = split_moe_param_groups(optimizer, scheduler)
        return optimizer, scheduler_config

    @property
    def _device_rank(self) -> int:
        # DeepSpeed needs a device index >= 0; CPU devices have none (Lightning passes None and DeepSpeed fails)
        index = self.root_device.index
        return self.local_rank if index is None else index

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        from moe_plugin.parallel.deepspeed_engine import initialize_expert_parallel_engine

        assert isinstance(self.config, dict)
        return initialize_expert_parallel_engine(model, self.config, optimizer, lr_scheduler, self._device_rank)

    def _initialize_deepspeed_inference(self, model: Any) -> None:
        from moe_plugin.parallel.deepspeed_engine import initialize_expert_parallel_engine

        assert isinstance(self.config, dict)
        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                config[key] = self.config[key]
        if self.zero_stage == 3:
            config["zero_allow_untested_optimizer"] = self.config.get("zero_allow_untested_optimizer", True)
            config["zero_optimization"] = self.config["zero_optimization"]
        self.model, _ = initialize_expert_parallel_engine(model, config, None, None, self._device_rank)

    # ------------------------------------------------------------------------------- checkpoints
    def _original_names(self) -> list[list[str]]:
        """Parameter names per optimizer group as configure_optimizers made them (before the MoE split)."""
        module = self.lightning_module
        assert module is not None
        by_id = {id(p): n for n, p in module.named_parameters()}
        return [[by_id[id(p)] for p in g] for g in getattr(self, "_original_groups", [])]

    def _original_hyperparameters(self) -> list[dict[str, Any]]:
        """Hyper-parameters (lr, betas, ...) of each original group, read from its first split group."""
        groups = self.optimizers[0].param_groups
        out: list[dict[str, Any] | None] = [None] * len(self._original_groups)
        for g, o in zip(groups, self.group_origin):
            if out[o] is None:
                out[o] = {k: v for k, v in g.items() if k not in ("params", "moe", "name")}
        return [h or {} for h in out]

    def _save_layout_free(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any) -> None:
        from moe_plugin.parallel.checkpoint import ShardedLayout, save_sharded
        from moe_plugin.parallel.deepspeed_state import get_state

        assert self.plan is not None and self.mesh is not None and self.lightning_module is not None
        filepath = self.broadcast(filepath)
        optimizer = self.optimizers[0] if self.optimizers else None
        weights, states, step = get_state(self.lightning_module, optimizer)  # collective
        ckpt = dict(checkpoint)
        ckpt["state_dict"] = {**checkpoint["state_dict"], **weights}
        names = self._original_names()
        with_optimizer = "optimizer_states" in checkpoint and optimizer is not None
        ckpt.pop("optimizer_states", None)
        if with_optimizer:
            ckpt["optimizer_states"] = [torch_optimizer_state(states, step, names, self._original_hyperparameters())]
            ckpt["lr_schedulers"] = [
                regroup_scheduler_state(s, self.group_origin, to_original=True) for s in ckpt.get("lr_schedulers", [])
            ]
        layout = ShardedLayout(self.mesh.world_size, self.mesh.rank, self.expert_parallel_size, self.plan.expert_params)

        def save_file(obj: dict[str, Any], path: str) -> None:
            self.checkpoint_io.save_checkpoint(obj, path, storage_options=storage_options)

        save_sharded(ckpt, filepath, layout, [names] if with_optimizer else [], save_file)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self.plan is None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if self.checkpoint_format == "moe_plugin":
            return self._save_layout_free(checkpoint, filepath, storage_options)
        if self.zero_stage == 3:
            raise RuntimeError(
                "strategy.checkpoint_format=deepspeed at ZeRO-3: deepspeed_ep converts only ZeRO-1/2 DeepSpeed "
                "directories. Use strategy.checkpoint_format=moe_plugin (layout-free) at ZeRO-3."
            )
        from moe_plugin.convert.deepspeed_checkpoint import RECORD_KEY

        assert self.mesh is not None
        record = {
            "format_version": 1,
            "zero_stage": self.zero_stage,
            "world_size": self.mesh.world_size,
            "expert_parallel_size": self.expert_parallel_size,
            "expert_params": {n: e for n, (e, _, _) in self.plan.expert_params.items()},
            "original_names": self._original_names(),
            "original_hyperparameters": self._original_hyperparameters(),
            "group_origin": self.group_origin,
        }
        super().save_checkpoint({**checkpoint, RECORD_KEY: record}, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from moe_plugin.convert.deepspeed_checkpoint import is_deepspeed_checkpoint
        from moe_plugin.parallel.checkpoint import load_for_rank

        checkpoint_path = self.broadcast(checkpoint_path)
        assert self.plan is not None, "deepspeed_ep restores checkpoints after setup"
        # every checkpoint is set by parameter name (any layout); a DeepSpeed directory is read as a whole first
        self._loaded_layout_free = True

        def load_file(path: str) -> dict[str, Any]:
            if weights_only is None:
                return self.checkpoint_io.load_checkpoint(path)
            return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)

        if is_deepspeed_checkpoint(checkpoint_path) and self._same_layout_as(checkpoint_path):
            # saved at this very layout: DeepSpeed's own loader restores its partitions (a DeepSpeed resume)
            from moe_plugin.parallel.deepspeed_state import copy_master_weights_to_model

            self._loaded_layout_free = False
            client_state = super().load_checkpoint(checkpoint_path, weights_only)
            copy_master_weights_to_model(self.lightning_module)  # experts are not in DeepSpeed's model-states file
            return client_state
        if is_deepspeed_checkpoint(checkpoint_path):
            from moe_plugin.convert.deepspeed_checkpoint import to_plain_checkpoint

            plain = to_plain_checkpoint(checkpoint_path)
            checkpoint_path = f"{checkpoint_path}#deepspeed"  # not a directory: read as the plain dict below
            load_file = lambda path: plain  # noqa: E731

        names = self._original_names()
        ckpt = load_for_rank(checkpoint_path, self.plan.expert_params, [names] if names else [], load_file)
        if self.group_origin:
            ckpt["lr_schedulers"] = [
                regroup_scheduler_state(s, self.group_origin, to_original=False) for s in ckpt.get("lr_schedulers", [])
            ]
        return ckpt

    def _same_layout_as(self, path: Any) -> bool:
        """Whether a deepspeed_ep DeepSpeed directory was saved at this run's world size, EP and ZeRO stage."""
        from moe_plugin.convert.deepspeed_checkpoint import read_record

        assert self.mesh is not None
        record = read_record(path)
        here = (self.mesh.world_size, self.expert_parallel_size, self.zero_stage)
        return (
            record is not None and (record["world_size"], record["expert_parallel_size"], record["zero_stage"]) == here
        )

    @property
    def lightning_restore_optimizer(self) -> bool:
        # DeepSpeed restores its own directories itself; a layout-free checkpoint's optimizer state is set by name
        return bool(getattr(self, "_loaded_layout_free", False))

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        if not getattr(self, "_loaded_layout_free", False):
            return super().load_model_state_dict(checkpoint, strict)
        from moe_plugin.parallel.deepspeed_state import set_weights

        module = self.lightning_module
        assert module is not None
        state = checkpoint["state_dict"]
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        unknown = [k for k in state if k not in params and k not in buffers]
        if strict and unknown:
            raise KeyError(f"the checkpoint has entries the model does not: {unknown[:5]}. Resume with the same model.")
        set_weights(module, {k: v for k, v in state.items() if k in params}, strict)
        module.load_state_dict({k: v for k, v in state.items() if k in buffers}, strict=False)

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        if not getattr(self, "_loaded_layout_free", False):
            return super().load_optimizer_state_dict(checkpoint)
        from moe_plugin.parallel.checkpoint import optimizer_state_to_named
        from moe_plugin.parallel.deepspeed_state import set_optimizer_state

        module = self.lightning_module
        assert module is not None
        named = optimizer_state_to_named(checkpoint["optimizer_states"][0], self._original_names())
        step = next((float(st["step"]) for st in named["state"].values() if "step" in st), None)
        states = {n: {k: v for k, v in st.items() if k != "step"} for n, st in named["state"].items()}
        if states:
            set_optimizer_state(module, self.optimizers[0], states, step)
        for group, origin in zip(self.optimizers[0].param_groups, self.group_origin):
            group.update({k: v for k, v in named["param_groups"][origin].items() if k != "params"})


def register() -> None:
    if "deepspeed_ep" not in StrategyRegistry:
        StrategyRegistry.register(
            "deepspeed_ep",
            DeepSpeedExpertParallelStrategy,
            description="DeepSpeed ZeRO (any vendor DeepSpeed supports) with moe_plugin expert parallelism",
        )


__all__ = ["CHECKPOINT_FORMATS", "DeepSpeedExpertParallelStrategy", "load_deepspeed_config", "register"]
