"""LocalSGDStrategy: islands that train synchronously inside and exchange parameter deltas between them
(EDiT / A-EDiT, arXiv 2412.07210), registered as "local_sgd". See docs/islands.md.

    python train.py strategy=local_sgd strategy.island_size=1 trainer.devices=2                  # 2 islands of 1
    python train.py strategy=local_sgd strategy.island_size=2 strategy.expert_parallel_size=2 trainer.devices=4
    python train.py strategy=local_sgd strategy.island_size=1 strategy.sync_every_steps=null \
        strategy.sync_every_seconds=5 strategy.sync_min_steps=4 trainer.devices=2                # time-based

Inside an island this is the expert_parallel strategy (ExpertParallelStrategy: DDP + experts sharded over the
island's EP ranks) on the island's own process groups (parallel/islands.py). Between islands, at the end of a
round, the outer step of parallel/outer.py runs: pseudo-gradients screened, averaged by global expert id on the
outer group (gloo by default), Nesterov outer optimizer on the synchronised copy, which every island continues
from. Everything Lightning reduces (logged metrics, barriers, broadcasts, stop decisions) and every consensus of
our callbacks (`consensus_group`) stays inside the island: islands never wait on each other between syncs.

Rounds. Island k syncs after H_k optimizer steps, agreed at the previous sync from numbers every island sees:
    sync_every_steps=H:      H_k = H
    sync_every_seconds=tau:  H_k = max(sync_min_steps, round(tau * steps_k / seconds_k)) from island k's last
                             round (A-EDiT: a faster island takes more local steps; the first round uses
                             sync_min_steps). Agreeing on counts rather than on clocks costs no per-step collective.
    with trainer.max_steps: H_k is capped so no island passes max_steps; the round in which one reaches it is the
    last one for every island (they stop together after it). An island that stops for another reason
    (preemption, an error that Lightning handles) syncs at once with a stop flag, and the others stop after
    that sync.

Checkpoints (a directory P, the expert_parallel format): island 0 writes P, island k writes P/island{k:03d};
each holds its own weights and inner optimizer state, and the outer state (synchronised weights, outer momentum
under `_local_sgd.`, sharded by expert id; detectors and round schedule under "local_sgd"). With step-based
sync islands save at the same step. With time-based sync a save is deferred to the next sync, where every
island writes the same consistent cut (the directory keeps the name of the request).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from moe_plugin.accelerators.lightning_accelerators import VendorDDPStrategy
from moe_plugin.layers.moe import moe_layers
from moe_plugin.lightning.callbacks.spike_detector import EWMAZScore
from moe_plugin.lightning.events import append_event, events_path
from moe_plugin.lightning.strategies.expert_parallel import ExpertParallelStrategy
from moe_plugin.lightning.strategies.local_sgd_checkpoint import IslandCheckpoints
from moe_plugin.lightning.strategies.local_sgd_sigterm import scope_sigterm_to_island
from moe_plugin.parallel.islands import (
    IslandMesh,
    build_island_mesh,
    check_islands,
    island_barrier,
    island_broadcast_object,
    parse_expert_parallel_sizes,
    parse_inner_backends,
    parse_islands,
)
from moe_plugin.parallel.outer import (
    WEIGHTINGS,
    global_weighted_sum,
    make_slots,
    outer_sgd_step,
    screen,
    sum_over_group,
)

log = logging.getLogger(__name__)

# per-island statistics exchanged at every sync: squared pseudo-gradient norm, local steps, seconds, global step,
# a checkpoint save pending, a stop request
_NORM2, _STEPS, _SECONDS, _GSTEP, _PENDING, _STOP = range(6)


class LocalSGDStrategy(IslandCheckpoints, ExpertParallelStrategy):
    strategy_name = "local_sgd"

    def __init__(
        self,
        island_size: int | None = 1,
        islands: list[list[int]] | None = None,
        expert_parallel_size: int | list[int] = 1,
        sync_every_steps: int | None = 10,
        sync_every_seconds: float | None = None,
        sync_min_steps: int = 1,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.8,
        outer_nesterov: bool = True,
        screening: bool = True,
        weighting: str = "softmax",
        temperature: float = 1.0,
        clip_norm: float | None = None,
        screen_per_step: bool = True,
        detector_alpha: float = 0.02,
        detector_warmup: int = 10,
        detector_threshold: float = 3.0,
        inner_backend: str | list[str | None] | None = None,
        outer_backend: str = "gloo",
        bucket_mb: float = 64.0,
        average_buffers: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            island_size: ranks per island (consecutive ranks); or give `islands` instead (set this to None).
            islands: explicit global ranks of each island, e.g. [[0, 1], [2, 3, 4, 5]].
            expert_parallel_size: EP inside each island (an int for all, or one per island).
            sync_every_steps: H, local optimizer steps per round (step-based sync); or None with
                sync_every_seconds.
            sync_every_seconds: tau, target wall-clock seconds per round (A-EDiT); needs trainer.max_steps.
            sync_min_steps: fewest local steps in a time-based round (and the first round's length).
            outer_lr, outer_momentum, outer_nesterov: the outer SGD (EDiT: 0.7, 0.8, Nesterov).
            screening: reject islands whose pseudo-gradient norm is anomalous (EWMA z-score per island).
            weighting: softmax (exp(-norm / temperature), EDiT), uniform, or steps (local steps per island).
            temperature: T of the softmax weighting.
            clip_norm: clip each island's pseudo-gradient to this 2-norm before averaging (None: no clipping).
            screen_per_step: the detector and the softmax see each island's norm rescaled to the mean local step
                count, n_k * mean(H) / H_k (parallel/outer.py); equal to EDiT's raw norm when rounds are equal.
            detector_alpha, detector_warmup, detector_threshold: the EWMA z-score detector (warm-up in syncs).
            inner_backend: backend of each island's own groups (DDP, expert all-to-all): one name for all, one per
                island (e.g. [nccl, hccl]), or None for the world group's (process_group_backend).
            outer_backend: backend of the inter-island group (gloo: host memory, any mix of vendors).
            bucket_mb: size of the exchange buckets (bounds the extra memory of one sync).
            average_buffers: average floating-point buffers (e.g. the expert bias) over islands at each sync.
            kwargs: ExpertParallelStrategy's (timeout_seconds, process_group_backend, start_method, ...).
        """
        if (sync_every_steps is None) == (sync_every_seconds is None):
            raise ValueError(
                f"set exactly one of strategy.sync_every_steps ({sync_every_steps}) and strategy.sync_every_seconds "
                f"({sync_every_seconds}); e.g. strategy.sync_every_steps=null strategy.sync_every_seconds=5."
            )
        if sync_every_steps is not None and int(sync_every_steps) < 1:
            raise ValueError(f"strategy.sync_every_steps={sync_every_steps} must be >= 1.")
        if sync_every_seconds is not None and not sync_every_seconds > 0:
            raise ValueError(f"strategy.sync_every_seconds={sync_every_seconds} must be > 0.")
        if int(sync_min_steps) < 1:
            raise ValueError(f"strategy.sync_min_steps={sync_min_steps} must be >= 1.")
        if not outer_lr > 0 or not 0 <= outer_momentum < 1:
            raise ValueError(
                f"strategy.outer_lr={outer_lr} must be > 0 and strategy.outer_momentum={outer_momentum} in [0, 1)."
            )
        if weighting not in WEIGHTINGS:
            raise ValueError(f"strategy.weighting={weighting!r} must be one of {WEIGHTINGS}.")
        if not temperature > 0 or (clip_norm is not None and not clip_norm > 0):
            raise ValueError(
                f"strategy.temperature={temperature} must be > 0 and strategy.clip_norm={clip_norm} > 0 or null."
            )
        EWMAZScore(detector_alpha, detector_warmup, detector_threshold)  # validate now, before any process waits
        ep = expert_parallel_size if isinstance(expert_parallel_size, int) else list(expert_parallel_size)
        if any(int(e) < 1 for e in ([ep] if isinstance(ep, int) else ep)):
            raise ValueError(f"strategy.expert_parallel_size={expert_parallel_size} must be >= 1 (per island).")
        super().__init__(expert_parallel_size=1, **kwargs)
        self._ep_config = ep
        self.island_size = island_size
        self.islands_config = [list(i) for i in islands] if islands is not None else None
        self.sync_every_steps = int(sync_every_steps) if sync_every_steps is not None else None
        self.sync_every_seconds = float(sync_every_seconds) if sync_every_seconds is not None else None
        self.sync_min_steps = int(sync_min_steps)
        self.outer_lr, self.outer_momentum, self.outer_nesterov = float(outer_lr), float(outer_momentum), outer_nesterov
        self.screening, self.weighting, self.temperature, self.clip_norm = screening, weighting, temperature, clip_norm
        self.screen_per_step = bool(screen_per_step)
        self.detector_args = (float(detector_alpha), int(detector_warmup), float(detector_threshold))
        self.outer_backend = outer_backend
        self.inner_backend = (
            inner_backend if inner_backend is None or isinstance(inner_backend, str) else list(inner_backend)
        )
        self.bucket_numel = max(1, int(bucket_mb * 2**20 / 4))
        self.average_buffers = average_buffers
        self.mesh: IslandMesh | None = None  # type: ignore[assignment]
        self._outer_ready = False
        self._pending: list[str] = []

    # ------------------------------------------------------------------------------------ set-up
    @property
    def time_based(self) -> bool:
        return self.sync_every_seconds is not None

    @property
    def consensus_group(self) -> dist.ProcessGroup | None:
        """The group our callbacks agree over (spike guard, straggler monitor, preemption): the island."""
        return self.mesh.island_group if self.mesh is not None else None

    @property
    def evaluation_rank_world(self) -> tuple[int, int] | None:
        """(rank, ranks) that split validation data: each island evaluates the whole validation set."""
        return (self.mesh.rank, self.mesh.world_size) if self.mesh is not None else None

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        islands = parse_islands(world, self.island_size if self.islands_config is None else None, self.islands_config)
        ep_sizes = parse_expert_parallel_sizes(self._ep_config, len(islands))
        module = self.lightning_module
        check_islands(islands, ep_sizes, [m.num_experts for m in moe_layers(module)] if module is not None else [])
        inner = parse_inner_backends(self.inner_backend, len(islands))
        VendorDDPStrategy.setup_environment(self)  # the process group; not ExpertParallelStrategy's world mesh
        if self.mesh is not None:
            return
        inner = [b or self._process_group_backend for b in inner]
        self.mesh = build_island_mesh(islands, ep_sizes, self._timeout, inner, self.outer_backend)
        self.expert_parallel_size = self.mesh.expert_parallel_size
        self._ddp_kwargs["process_group"] = self.mesh.island_group  # DDP all-reduces inside the island only
        rank_zero_info(
            f"local_sgd: {len(islands)} islands {islands}, EP {ep_sizes}, inner backends {inner}, outer backend "
            f"{self.outer_backend}, "
            + (
                f"sync every {self.sync_every_steps} steps"
                if not self.time_based
                else f"sync every ~{self.sync_every_seconds} s"
            )
        )

    def setup(self, trainer: pl.Trainer) -> None:
        if (
            self.time_based
            and trainer.state.fn == TrainerFn.FITTING
            and not (trainer.max_steps and trainer.max_steps > 0)
        ):
            raise ValueError(
                f"strategy.sync_every_seconds={self.sync_every_seconds} needs trainer.max_steps > 0 (got "
                f"{trainer.max_steps}): islands run at different speeds, so they agree to stop at a step budget. "
                "Set trainer.max_steps, or use strategy.sync_every_steps."
            )
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._setup_outer(trainer)

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        assert self.lightning_module is not None
        return [(n, p) for n, p in self.lightning_module.named_parameters() if p.requires_grad]

    def _buffers(self) -> list[tuple[str, torch.Tensor]]:
        assert self.lightning_module is not None
        return [(n, b) for n, b in self.lightning_module.named_buffers() if b.is_floating_point()]

    @torch.no_grad()
    def _setup_outer(self, trainer: pl.Trainer) -> None:
        """Synchronised copy = island 0's weights (so every island starts identical), momentum 0, detectors."""
        assert self.mesh is not None and self.plan is not None
        m = self.mesh
        named = self._trainable()
        self._slots = make_slots(named, self.plan.expert_params)
        # each value counted once per island: dense by the island's rank 0, experts by their first replica
        self._owned = [(m.dp_rank == 0) if n in self.plan.expert_params else (m.rank == 0) for n, _ in named]
        self._buffer_slots = make_slots(self._buffers(), {})
        island0 = m.island_index == 0
        synced = global_weighted_sum(
            self._slots,
            [p for _, p in named],
            [float(island0 and o) for o in self._owned],
            m.outer_group,
            self._exchange_device,
            self.bucket_numel,
        )
        self._synced = synced
        for (_, p), s in zip(named, synced):
            p.copy_(s)
        self._momentum = [torch.zeros_like(s) for s in synced]
        self._detectors = [EWMAZScore(*self.detector_args) for _ in range(m.num_islands)]
        self._round = 0
        self.synced_island_steps = 0  # optimizer steps of all islands folded into the synchronised weights
        self._round_start_step = trainer.global_step
        self._round_steps = self._first_round_steps()
        self._final = self._is_last_round(
            trainer, [trainer.global_step] * m.num_islands, [self._round_steps] * m.num_islands
        )
        self._stopped = False
        self._pending: list[str] = []
        self._saving_now = False
        self._t0 = time.monotonic()
        self._outer_from_params = False
        self._outer_ready = True
        # Lightning broadcasts a SIGTERM flag from rank 0 over EVERY rank before each training batch: across
        # islands that ties their steps together (a deadlock with time-based rounds). Agree inside the island.
        scope_sigterm_to_island(trainer, m, self.root_device, required=self.time_based)
        if not any(isinstance(cb, _OuterSync) for cb in trainer.callbacks):
            # last, after ModelCheckpoint: a save requested at a sync step is pending when the sync runs, which
            # then writes it at the synchronised state on every island
            trainer.callbacks.append(_OuterSync(self))

    @property
    def _exchange_device(self) -> torch.device:
        return torch.device("cpu") if self.outer_backend == "gloo" else self.root_device

    def _first_round_steps(self) -> int:
        return self.sync_every_steps if self.sync_every_steps is not None else self.sync_min_steps

    def _is_last_round(self, trainer: pl.Trainer, gsteps: list[int], H: list[int]) -> bool:
        return bool(
            trainer.max_steps and trainer.max_steps > 0 and any(g + h >= trainer.max_steps for g, h in zip(gsteps, H))
        )

    # -------------------------------------------------------------------- island-scoped collectives
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self.mesh is None or not dist.is_initialized():
            return super().barrier(*args, **kwargs)
        island_barrier(self.mesh)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.mesh is None or not dist.is_initialized():
            return super().broadcast(obj, src)
        return island_broadcast_object(obj, src, self.mesh)

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        return super().reduce(tensor, group=group if group is not None else self.consensus_group, reduce_op=reduce_op)

    def all_gather(self, tensor: torch.Tensor, group: Any = None, sync_grads: bool = False) -> torch.Tensor:
        return super().all_gather(
            tensor, group=group if group is not None else self.consensus_group, sync_grads=sync_grads
        )

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        t = self.reduce(torch.tensor(int(decision), device=self.root_device), reduce_op="sum")
        n = self.mesh.world_size if self.mesh is not None else self.world_size
        return bool(t == n) if all else bool(t)

    # ------------------------------------------------------------------------------ synchronisation
    def _after_batch(self, trainer: pl.Trainer) -> None:
        if not self._outer_ready or self._stopped:
            return
        due = trainer.global_step - self._round_start_step >= self._round_steps
        if due or trainer.should_stop:
            self._synchronise(trainer, stop=bool(trainer.should_stop) and not due)
        elif not self.time_based:
            self._settle(trainer)

    def _after_validation(self, trainer: pl.Trainer) -> None:
        if self._outer_ready and not self._stopped and not self.time_based and not trainer.sanity_checking:
            self._settle(trainer)

    def _at_train_end(self, trainer: pl.Trainer) -> None:
        """Every island ends fit after the same number of syncs: one that ends without an agreed stop (epochs ran
        out, a handled error) syncs now with a stop flag; then saves requested after the last sync are written."""
        if not self._outer_ready:
            return
        if not self._stopped:
            self._synchronise(trainer, stop=True)
        self._settle(trainer)

    @torch.no_grad()
    def _synchronise(self, trainer: pl.Trainer, stop: bool = False) -> None:
        assert self.mesh is not None
        m = self.mesh
        K, k, leader = m.num_islands, m.island_index, m.rank == 0
        seconds = time.monotonic() - self._t0
        steps = trainer.global_step - self._round_start_step
        params = [p for _, p in self._trainable()]
        # pseudo-gradients Delta = theta_s - theta_k, one tensor at a time (never the whole model at once)
        deltas = [functools.partial(_delta, s, p) for s, p in zip(self._synced, params)]
        stats = torch.zeros(K, 6, dtype=torch.float64)
        stats[k, _NORM2] = float(
            sum(
                (d().double().pow(2).sum() for d, o in zip(deltas, self._owned) if o),
                torch.zeros((), dtype=torch.float64),
            )
        )
        if leader:
            stats[k, _STEPS], stats[k, _SECONDS], stats[k, _GSTEP] = steps, seconds, trainer.global_step
            stats[k, _PENDING], stats[k, _STOP] = float(bool(self._pending)), float(stop)
        stats = sum_over_group(stats, m.outer_group)
        norms = [math.sqrt(x) if x >= 0 else math.nan for x in stats[:, _NORM2].tolist()]
        all_steps = [int(x) for x in stats[:, _STEPS].tolist()]
        decision = screen(
            norms,
            all_steps,
            self._detectors if self.screening else None,
            self.weighting,
            self.temperature,
            self.clip_norm,
            self.screen_per_step,
        )
        if decision.any_accepted:
            factors = [decision.factors[k] if o else 0.0 for o in self._owned]

            def outer_step(i: int, avg: torch.Tensor) -> None:  # per tensor, as soon as its bucket is reduced
                outer_sgd_step(
                    [self._synced[i]],
                    [avg],
                    [self._momentum[i]],
                    self.outer_lr,
                    self.outer_momentum,
                    self.outer_nesterov,
                )

            global_weighted_sum(
                self._slots, deltas, factors, m.outer_group, self._exchange_device, self.bucket_numel, outer_step
            )
        for p, s in zip(params, self._synced):
            p.copy_(s)  # every island continues from the synchronised weights (all rejected: its deltas are dropped)
        if self.average_buffers and self._buffer_slots:
            buffers = [b for _, b in self._buffers()]
            mean = global_weighted_sum(
                self._buffer_slots,
                buffers,
                1.0 / K if leader else 0.0,
                m.outer_group,
                self._exchange_device,
                self.bucket_numel,
            )
            for b, v in zip(buffers, mean):
                b.copy_(v)
        self._round += 1
        self.synced_island_steps += sum(all_steps)
        self._log(trainer, decision, all_steps, stats[:, _SECONDS].tolist())
        # the next round, agreed from numbers every island now holds
        gsteps = [int(x) for x in stats[:, _GSTEP].tolist()]
        H = [self._planned_steps(all_steps[i], float(stats[i, _SECONDS])) for i in range(K)]
        if trainer.max_steps and trainer.max_steps > 0:
            H = [max(1, min(h, trainer.max_steps - g)) for h, g in zip(H, gsteps)]
        stopping = self._final or bool(stats[:, _STOP].sum() > 0)
        self._round_start_step, self._round_steps = trainer.global_step, H[k]
        self._final = self._is_last_round(trainer, gsteps, H)
        if stats[:, _PENDING].sum() > 0:
            self._write_pending(trainer)
        if stopping:
            self._stopped = True
            trainer.should_stop = True
        self._t0 = time.monotonic()

    def _planned_steps(self, steps: int, seconds: float) -> int:
        if self.sync_every_seconds is None:
            return self.sync_every_steps  # type: ignore[return-value]
        if steps <= 0 or seconds <= 0:
            return self.sync_min_steps
        return max(self.sync_min_steps, round(self.sync_every_seconds * steps / seconds))

    def _log(self, trainer: pl.Trainer, d: Any, steps: list[int], seconds: list[float]) -> None:
        if not trainer.is_global_zero:
            return
        metrics: dict[str, float] = {"outer/round": float(self._round)}
        for i in range(len(steps)):
            metrics.update(
                {
                    f"outer/norm_island{i}": d.norms[i],
                    f"outer/weight_island{i}": d.weights[i],
                    f"outer/steps_island{i}": float(steps[i]),
                    f"outer/seconds_island{i}": seconds[i],
                }
            )
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
        path = events_path(trainer, None)
        rejected = [i for i, a in enumerate(d.accepted) if not a]
        clipped = [i for i, c in enumerate(d.clip_coefs) if c < 1.0 and d.accepted[i]]
        common = {"step": trainer.global_step, "round": self._round}
        for i in rejected:
            append_event(path, "local_sgd", "reject", island=i, norm=d.norms[i], zscore=d.zscores[i], **common)
        if rejected and not d.any_accepted:
            append_event(path, "local_sgd", "all_rejected", **common)
        for i in clipped:
            append_event(path, "local_sgd", "clip", island=i, norm=d.norms[i], coef=d.clip_coefs[i], **common)
        append_event(
            path,
            "local_sgd",
            "sync",
            steps=steps,
            seconds=[round(s, 3) for s in seconds],
            norms=[round(n, 6) for n in d.norms],
            scored=[round(n, 6) for n in d.scored],
            weights=[round(w, 6) for w in d.weights],
            **common,
        )

    # ------------------------------------------------------------------------------- checkpoints
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if self.mesh is not None:
            log.error(
                "local_sgd: island %d (ranks %s) stops: %s: %s. If another island died, resume all islands from the "
                "last checkpoint (resume=auto with the same run folder).",
                self.mesh.island_index,
                self.mesh.global_ranks,
                type(exception).__name__,
                str(exception)[:300],
            )


def _delta(synced: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Island k's pseudo-gradient for one tensor: theta_s - theta_k, float32 on the exchange device."""
    return synced - param.detach().to(synced.device, torch.float32)


class _OuterSync(pl.Callback):
    """Runs the outer step at the end of a training batch, after ModelCheckpoint (appended by the strategy)."""

    def __init__(self, strategy: LocalSGDStrategy) -> None:
        self.strategy = strategy

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.strategy._t0 = time.monotonic()  # a round's time is training time, not start-up

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.strategy._after_batch(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.strategy._after_validation(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.strategy._at_train_end(trainer)


def register() -> None:
    if "local_sgd" not in StrategyRegistry:
        StrategyRegistry.register(
            "local_sgd",
            LocalSGDStrategy,
            description="islands with local SGD (EDiT): synchronous inside, parameter deltas between (moe_plugin)",
        )


__all__ = ["LocalSGDStrategy", "register"]
