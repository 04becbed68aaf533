"""ExpertParallelStrategy: Lightning's DDP plus expert parallelism, registered as "expert_parallel".

    Trainer(strategy="expert_parallel", devices=4)                        # EP=1: DDP + sharded checkpoints
    Trainer(strategy=ExpertParallelStrategy(expert_parallel_size=2), devices=4)
    python train.py strategy=expert_parallel strategy.expert_parallel_size=2 trainer.devices=2

What it adds to DDP (VendorDDPStrategy: the vendor backend, no CUDA-only stream), in the order Lightning calls it:
- setup_environment: checks the layout (world % EP, EP <= world, num_experts % EP) BEFORE creating the
  process group, so a bad layout fails on every rank without anyone waiting; then init_process_group
  (backend from the vendor layer, `timeout_seconds` on every group) and the (data, expert) mesh.
- setup: apply_expert_parallel(lightning_module, mesh) (local experts + AllToAllDispatcher), experts
  excluded from DDP, then DDP wraps the rest and the optimizers are built on the local parameters.
- optimizer_step: after backward and before clipping/step, expert gradients are summed over the
  expert-data-parallel group and divided by the world size (grads.py); clipping by norm sees every
  expert once.
- save_checkpoint / load_checkpoint: sharded directory checkpoints loadable at any layout
  (moe_plugin/parallel/checkpoint.py), written through `self.checkpoint_io`. Restoring happens after
  setup, when the local expert ranges and optimizers exist.
"""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from moe_plugin.accelerators.lightning_accelerators import VendorDDPStrategy
from moe_plugin.layers.moe import moe_layers
from moe_plugin.parallel.apply import ExpertParallelPlan, apply_expert_parallel
from moe_plugin.parallel.checkpoint import (
    ShardedLayout,
    load_for_rank,
    optimizer_param_names,
    save_sharded,
)
from moe_plugin.parallel.grads import (
    broadcast_dense_states,
    clip_grad_norm_expert_parallel,
    exclude_from_ddp,
    reduce_expert_gradients,
)
from moe_plugin.parallel.mesh import ExpertParallelMesh, build_expert_parallel_mesh, check_layout

log = logging.getLogger(__name__)


def collective_backend(device_type: str) -> str:
    """Backend for `device_type`: the vendor layer's answer when it is installed, else gloo (cpu) / nccl (cuda)."""
    try:
        from moe_plugin.accelerators.profiles import default_backend
    except ImportError:
        return "nccl" if device_type == "cuda" else "gloo"
    return default_backend(device_type)


class ExpertParallelStrategy(VendorDDPStrategy):
    strategy_name = "expert_parallel"

    def __init__(
        self,
        expert_parallel_size: int = 1,
        process_group_backend: str | None = None,
        timeout_seconds: float = 1800.0,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        reduce_router_counts: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            expert_parallel_size: EP, ranks each layer's experts are split over (1 = every rank holds all).
            process_group_backend: override the collective backend (default: from the device's vendor).
            timeout_seconds: how long a collective waits for a peer before raising (a dead rank makes the
                others exit with an error after this long instead of hanging).
            start_method: how Lightning starts local processes ("popen" re-runs the script, as DDP does).
            reduce_router_counts: sum router token counts over all ranks for the balance loss and load
                statistics (values equal one process on the global batch); False = per-rank counts.
            kwargs: passed to DDPStrategy / DistributedDataParallel.
        """
        if int(expert_parallel_size) < 1:
            raise ValueError(f"strategy.expert_parallel_size={expert_parallel_size} must be >= 1.")
        if timeout_seconds <= 0:
            raise ValueError(f"strategy.timeout_seconds={timeout_seconds} must be > 0 (seconds).")
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=timeout_seconds),
            start_method=start_method,
            **kwargs,
        )
        self.expert_parallel_size = int(expert_parallel_size)
        self.timeout_seconds = timeout_seconds
        self.reduce_router_counts = reduce_router_counts
        self.mesh: ExpertParallelMesh | None = None
        self.plan: ExpertParallelPlan | None = None

    # ------------------------------------------------------------------------------------ set-up
    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or collective_backend(self.root_device.type)

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        module = self.lightning_module
        num_experts = [m.num_experts for m in moe_layers(module)] if module is not None else []
        check_layout(world, self.expert_parallel_size, num_experts)  # before any rank waits on another
        super().setup_environment()
        if self.mesh is not None:  # fit then validate with the same Trainer: the groups exist already
            return
        self.mesh = build_expert_parallel_mesh(
            self.expert_parallel_size, timeout=self._timeout, backend=self._process_group_backend
        )
        rank_zero_info(f"expert parallelism: {self.mesh} backend={self._process_group_backend}")

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # the checkpoint is resharded onto this rank's expert range, known only once experts are sharded
        return True

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None and self.mesh is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        self.plan = apply_expert_parallel(module, self.mesh, self.reduce_router_counts)
        trainer_fn = trainer.state.fn
        if trainer_fn == TrainerFn.FITTING and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer_fn == TrainerFn.FITTING:
            exclude_from_ddp(module, self.plan.expert_params)
            self.configure_ddp()
            self.setup_optimizers(trainer)
            self._install_expert_parallel_clipping()
        else:
            broadcast_dense_states(module, skip=set(self.plan.expert_params))
        self.setup_precision_plugin()
        if trainer_fn == TrainerFn.FITTING:
            from lightning.fabric.utilities.optimizer import _optimizers_to_device

            _optimizers_to_device(self.optimizers, self.root_device)

    def _parameters(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """(dense, expert) trainable parameters of the LightningModule."""
        assert self.plan is not None and self.lightning_module is not None
        dense, expert = [], []
        for name, p in self.lightning_module.named_parameters():
            if p.requires_grad:
                (expert if name in self.plan.expert_params else dense).append(p)
        return dense, expert

    def _install_expert_parallel_clipping(self) -> None:
        """Clip by the norm over ALL experts, not only this rank's (Lightning clips in the precision plugin)."""
        plugin = self.precision_plugin
        if getattr(plugin, "_moe_plugin_clipping", False):
            return

        def clip_grad_by_norm(optimizer: Any, clip_val: float) -> None:
            dense, expert = self._parameters()
            assert self.mesh is not None
            clip_grad_norm_expert_parallel(dense, expert, float(clip_val), self.mesh.expert_group)

        plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]
        plugin._moe_plugin_clipping = True  # type: ignore[attr-defined]

    @property
    def consensus_group(self) -> torch.distributed.ProcessGroup | None:
        """The group that must agree on per-step decisions (None = every rank; local_sgd: the island)."""
        return None

    def process_dataloader(self, dataloader: Any) -> Any:
        """Every rank must run the same number of batches (each forward is collective on the expert group).

        Training data is equal by construction (the samplers drop the last incomplete global batch); an
        evaluation loader that does not pad can give some ranks one batch more. Those are cut to the
        shortest rank's length here, with a warning, instead of hanging in the next all-to-all.
        """
        dataloader = super().process_dataloader(dataloader)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return dataloader
        try:
            n = len(dataloader)
        except TypeError:  # no length on any rank (same loader class everywhere): nothing to compare
            return dataloader
        bounds = torch.tensor([n, -n], dtype=torch.int64)
        torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MIN, group=self.consensus_group)
        shortest, longest = int(bounds[0]), -int(bounds[1])
        if shortest == longest:
            return dataloader
        rank_zero_warn(
            f"expert_parallel: ranks have between {shortest} and {longest} batches in a data loader; every rank "
            f"runs {shortest} (the all-to-all needs the same number of forwards everywhere). Pad the sampler or "
            "use drop_last to evaluate every sample."
        )
        return _FirstBatches(dataloader, shortest)

    # -------------------------------------------------------------------------------- gradients
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        return super().optimizer_step(optimizer, partial(self._closure_then_reduce, closure), model, **kwargs)

    def _closure_then_reduce(self, closure: Any) -> Any:
        """Run Lightning's closure (forward + backward), then reduce expert gradients before hooks/clipping."""
        out = closure()
        assert self.mesh is not None
        _, expert = self._parameters()
        reduce_expert_gradients(expert, self.mesh.expert_data_group, self.mesh.world_size)
        return out

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        text = f"{type(exception).__name__}: {exception}"
        if isinstance(exception, RuntimeError) and any(
            k in text for k in ("Connection closed", "Connection reset", "Timed out", "timed out", "DistBackendError")
        ):
            log.error(
                "rank %s: a collective failed: another rank died or did not answer within strategy.timeout_seconds=%s "
                "(%s). This rank exits instead of hanging. Resume from the last checkpoint with ckpt_path=<run>/"
                "checkpoints/last.ckpt (any strategy.expert_parallel_size).",
                self.global_rank,
                self.timeout_seconds,
                text.splitlines()[0][:300],
            )

    # ------------------------------------------------------------------------------- checkpoints
    def _layout(self) -> ShardedLayout:
        assert self.mesh is not None and self.plan is not None
        return ShardedLayout(self.mesh.world_size, self.mesh.rank, self.expert_parallel_size, self.plan.expert_params)

    def _optimizer_names(self) -> list[list[list[str]]]:
        module = self.lightning_module
        assert module is not None
        return [optimizer_param_names(getattr(o, "_optimizer", o), module) for o in self.optimizers]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self.plan is None:  # not set up yet (nothing sharded): plain DDP behaviour
            return super().save_checkpoint(checkpoint, filepath, storage_options)

        def save_file(obj: dict[str, Any], path: str) -> None:
            self.checkpoint_io.save_checkpoint(obj, path, storage_options=storage_options)

        names = self._optimizer_names() if "optimizer_states" in checkpoint else []
        save_sharded(checkpoint, filepath, self._layout(), names, save_file)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        assert self.plan is not None, "ExpertParallelStrategy restores checkpoints after setup"

        def load_file(path: str) -> dict[str, Any]:
            if weights_only is None:
                return self.checkpoint_io.load_checkpoint(path)
            return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)

        return load_for_rank(checkpoint_path, self.plan.expert_params, self._optimizer_names(), load_file)


class _FirstBatches:
    """The first `n` batches of a data loader; other attributes are the loader's (sampler, dataset, ...)."""

    def __init__(self, dataloader: Any, n: int) -> None:
        self.dataloader = dataloader
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.dataloader), self.n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataloader, name)


def register() -> None:
    if "expert_parallel" not in StrategyRegistry:
        StrategyRegistry.register(
            "expert_parallel",
            ExpertParallelStrategy,
            description="DDP with expert parallelism (moe_plugin): experts sharded over expert_parallel_size ranks",
        )
