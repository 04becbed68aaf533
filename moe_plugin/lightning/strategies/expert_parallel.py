"""ExpertParallelStrategy: Lightning's DDP plus expert parallelism, registered as "expert_parallel".

    Trainer(strategy="expert_parallel", devices=4)                        # EP=1: DDP + sharded checkpoints
    Trainer(strategy=ExpertParallelStrategy(expert_parallel_size=2), devices=4)
    Trainer(strategy=ExpertParallelStrategy(expert_parallel_size=2, data_parallel_shard_size=2), devices=4)
    python train.py strategy=expert_parallel strategy.expert_parallel_size=2 trainer.devices=2
    python train.py strategy=expert_parallel strategy.expert_parallel_size=2 strategy.data_parallel_shard_size=2 \
        trainer.devices=4                                                 # EP 2 x FSDP2 shard 2

data_parallel_shard_size = 1 is DDP of the dense part (below). data_parallel_shard_size = S > 1 replaces
DDP by FSDP2 (moe_plugin/parallel/sharding.py): the dense part is fully sharded over S ranks and
replicated over W / S (HSDP), experts are fully sharded over their expert-data-parallel ranks; FSDP
reduces the gradients (no DDP, no reduce_expert_gradients), clipping uses clip_grad_norm_sharded, and
checkpoints are written in format version 2 (dense state through torch.distributed.checkpoint).

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
import json
import logging
import os
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path
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
    DENSE_DIR,
    LAYOUT_KEY,
    META_FILE,
    ShardedLayout,
    load_for_rank,
    optimizer_param_names,
    save_sharded,
    shard_file_name,
)
from moe_plugin.parallel.consensus import min_over_ranks
from moe_plugin.parallel.fsdp_comms import check_comms
from moe_plugin.parallel.grads import (
    broadcast_dense_states,
    clip_grad_norm_expert_parallel,
    clip_grad_norm_sharded,
    exclude_from_ddp,
    reduce_expert_gradients,
)
from moe_plugin.parallel.materialise import materialise_, meta_init_context
from moe_plugin.parallel.mesh import ExpertParallelMesh, build_expert_parallel_mesh, check_layout
from moe_plugin.parallel.sharding import apply_sharded_data_parallel

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
        data_parallel_shard_size: int = 1,
        data_parallel_replicate_size: int | None = None,
        offload_optimizer: bool = False,
        meta_init: bool | None = None,
        fsdp_comms: str = "auto",
        expert_shard_size: int | None = None,
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
            data_parallel_shard_size: S, ranks the dense part is fully sharded over with FSDP2 (1 = DDP).
            data_parallel_replicate_size: R = world / S (HSDP's replicate axis); None derives it, a value is checked.
            offload_optimizer: keep the sharded parameters, gradients and optimizer state in host memory
                (FSDP2's CPUOffloadPolicy; needs data_parallel_shard_size > 1).
            meta_init: build the model on the meta device (model_init_context) and materialise only this rank's
                shards with the layout-independent init of parallel/materialise.py. None = on when
                data_parallel_shard_size > 1 (no rank ever holds the whole model).
            fsdp_comms: FSDP2's all-gather / reduce-scatter: "auto" (point-to-point exchanges on gloo, where that is
                about 2x faster than its collectives: parallel/fsdp_comms.py), "native", "p2p" or "all_reduce".
            expert_shard_size: ES, over how many of their W / EP data-parallel ranks experts are fully sharded
                (data_parallel_shard_size > 1): a divisor of W / EP; None = W / EP (parallel/mesh.py).
            kwargs: passed to DDPStrategy / DistributedDataParallel.
        """
        if int(expert_parallel_size) < 1:
            raise ValueError(f"strategy.expert_parallel_size={expert_parallel_size} must be >= 1.")
        if timeout_seconds <= 0:
            raise ValueError(f"strategy.timeout_seconds={timeout_seconds} must be > 0 (seconds).")
        if int(data_parallel_shard_size) < 1:
            raise ValueError(
                f"strategy.data_parallel_shard_size={data_parallel_shard_size} must be >= 1 (1 = DDP of the dense part)."
            )
        if offload_optimizer and int(data_parallel_shard_size) == 1:
            raise ValueError(
                "strategy.offload_optimizer=true needs strategy.data_parallel_shard_size > 1 (FSDP2's CPU offload). "
                "Set data_parallel_shard_size, or offload_optimizer=false."
            )
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=timeout_seconds),
            start_method=start_method,
            **kwargs,
        )
        self.expert_parallel_size = int(expert_parallel_size)
        self.timeout_seconds = timeout_seconds
        self.reduce_router_counts = reduce_router_counts
        self.data_parallel_shard_size = int(data_parallel_shard_size)
        self.data_parallel_replicate_size = data_parallel_replicate_size
        self.offload_optimizer = bool(offload_optimizer)
        self.meta_init = self.data_parallel_shard_size > 1 if meta_init is None else bool(meta_init)
        self.fsdp_comms = check_comms(fsdp_comms)
        self.expert_shard_size = expert_shard_size
        self.mesh: ExpertParallelMesh | None = None
        self.plan: ExpertParallelPlan | None = None

    # ------------------------------------------------------------------------------------ set-up
    def model_init_context(self) -> AbstractContextManager:
        """Where run.py builds the model: matrices on the meta device when meta_init (parallel/materialise.py)."""
        return meta_init_context() if self.meta_init else nullcontext()

    def _materialise(self, module: torch.nn.Module) -> None:
        """Allocate and initialise this rank's shards of a meta-built model (seed: pl.seed_everything's)."""
        assert self.plan is not None
        if not any(p.is_meta for p in module.parameters()):
            return
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        materialise_(module, seed, self.root_device, self.plan.expert_params)

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or collective_backend(self.root_device.type)

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        module = self.lightning_module
        num_experts = [m.num_experts for m in moe_layers(module)] if module is not None else []
        # before any rank waits on another
        check_layout(
            world,
            self.expert_parallel_size,
            num_experts,
            self.data_parallel_shard_size,
            self.data_parallel_replicate_size,
            self.expert_shard_size,
        )
        super().setup_environment()
        if self.mesh is not None:  # fit then validate with the same Trainer: the groups exist already
            return
        self.mesh = build_expert_parallel_mesh(
            self.expert_parallel_size,
            timeout=self._timeout,
            backend=self._process_group_backend,
            data_parallel_shard_size=self.data_parallel_shard_size,
            device_type=self.root_device.type,
            expert_shard_size=self.expert_shard_size,
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
        if self.mesh.sharded:
            return self._setup_sharded(trainer)
        self._materialise(module)  # a meta-built model under DDP: this rank's experts, the whole dense part
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

    def _setup_sharded(self, trainer: pl.Trainer) -> None:
        """FSDP2 instead of DDP: replicas made identical, fully_shard, then optimizers on the sharded parameters."""
        assert self.mesh is not None and self.plan is not None
        module = self.lightning_module
        assert module is not None
        self.precision_plugin.convert_module(self.model)
        if not any(p.is_meta for p in module.parameters()):
            self.model_to_device()
            # what DDP does at wrap time: every replica starts from rank 0's dense weights
            broadcast_dense_states(module, skip=set(self.plan.expert_params))
        apply_sharded_data_parallel(
            module,
            self.mesh,
            precision=self.precision_plugin.precision,
            offload_optimizer=self.offload_optimizer,
            children_as_roots=True,
            comms=self.fsdp_comms,
        )
        self._materialise(module)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._install_expert_parallel_clipping()
        self.setup_precision_plugin()

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
            mesh = self.mesh
            assert mesh is not None
            if mesh.sharded:
                R, ER = mesh.data_parallel_replicate_size, mesh.expert_replicate_size
                clip_grad_norm_sharded(dense, expert, float(clip_val), R, ER)
            else:
                clip_grad_norm_expert_parallel(dense, expert, float(clip_val), mesh.expert_group)

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
        shortest, neg_longest = min_over_ranks([n, -n], group=self.consensus_group)
        longest = -neg_longest
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
        if self.mesh.sharded:  # FSDP's reduce-scatter already applied the expert rule (sharding.py)
            return out
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
        assert self.mesh is not None
        if self.mesh.sharded:
            return self._save_sharded_v2(checkpoint, Path(filepath), names, save_file)
        save_sharded(checkpoint, filepath, self._layout(), names, save_file)

    def _save_sharded_v2(
        self, checkpoint: dict[str, Any], path: Path, names: list[list[list[str]]], save_file: Any
    ) -> None:
        """Format version 2 (checkpoint.py): DCP for the dense shards, experts by global index, meta last."""
        from moe_plugin.parallel.checkpoint_sharded import save_dense, split_sharded_checkpoint

        assert self.mesh is not None
        layout = self._layout()
        meta, shard, dense = split_sharded_checkpoint(checkpoint, layout, names, self.mesh.data_parallel_shard_size)
        if layout.rank == 0:
            if path.is_file():  # a plain checkpoint of an earlier run at the same name (e.g. last.ckpt)
                path.unlink()
            path.mkdir(parents=True, exist_ok=True)
        self.barrier("moe_plugin.save.mkdir")
        files = save_dense(dense, path / DENSE_DIR)
        # checksum sidecars for the DCP files this rank wrote (the coordinator also wrote .metadata)
        mine = [f for f in files if f.startswith(f"__{layout.rank}_") or (layout.rank == 0 and not f.startswith("__"))]
        for f in mine:
            _write_sidecar(path / DENSE_DIR / f, checkpoint.get("global_step"), checkpoint.get("epoch"))
        self.barrier("moe_plugin.save.dense")
        meta[LAYOUT_KEY]["shard_files"] = [
            *meta[LAYOUT_KEY]["expert_files"],
            *(f"{DENSE_DIR}/{f}" for f in files),
        ]
        if layout.writes_shard:
            save_file(shard, str(path / shard_file_name(layout.ep_rank, layout.expert_parallel_size)))
        if layout.rank == 0:
            save_file(meta, str(path / META_FILE))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        assert self.plan is not None, "ExpertParallelStrategy restores checkpoints after setup"

        def load_file(path: str) -> dict[str, Any]:
            if weights_only is None:
                return self.checkpoint_io.load_checkpoint(path)
            return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)

        assert self.mesh is not None
        if self.mesh.sharded:  # in place: each rank reads only its dense shards (DCP)
            from moe_plugin.parallel.checkpoint_sharded import load_into_sharded

            module = self.lightning_module
            assert module is not None
            optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
            return load_into_sharded(checkpoint_path, module, optimizers, self.plan.expert_params, load_file)
        return load_for_rank(checkpoint_path, self.plan.expert_params, self._optimizer_names(), load_file)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        if self.mesh is not None and self.mesh.sharded:
            return  # loaded in place by load_checkpoint
        super().load_model_state_dict(checkpoint, strict=strict)

    @property
    def lightning_restore_optimizer(self) -> bool:
        # the sharded layout loads optimizer state in place in load_checkpoint
        return not (self.mesh is not None and self.mesh.sharded)


def _write_sidecar(path: Path, global_step: Any, epoch: Any) -> None:
    """The checksum sidecar of a file written by DCP (same record as lightning/checkpoint_io.py's own files)."""
    from moe_plugin.lightning.checkpoint_io import sha256_of, sidecar_path

    record = {"sha256": sha256_of(path), "bytes": path.stat().st_size, "global_step": global_step, "epoch": epoch}
    side = sidecar_path(path)
    tmp = side.parent / f".{side.name}.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, side)


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
