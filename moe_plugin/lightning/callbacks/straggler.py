"""Straggler monitor: per-rank step-time statistics every N steps, slow ranks flagged with their slow phase.

Each rank times the phases of every training batch with wall-clock marks at Lightning hooks:

    data       previous on_train_batch_end -> on_train_batch_start   (data loading, and whatever runs between
                                                                      steps: checkpoint snapshot, logging)
    forward    on_train_batch_start -> on_before_backward
    backward   on_before_backward   -> on_after_backward              (includes DDP's gradient all-reduce)
    optimizer  on_after_backward    -> on_train_batch_end             (clipping, spike guard, step, scheduler)
    step       the sum of the four

Every `every_n_steps` optimizer steps the window means (R ranks x 4 phases) are exchanged with ONE all-gather
(moe_plugin.parallel.consensus.gather_floats: 4 floats per rank, one tiny collective per N steps).

In synchronous data parallelism every rank's STEP time is the same: the fast ranks wait for the slow one
inside the gradient all-reduce (backward). So the rule compares the time each rank spends in phases that
contain no collective ("sync-free phases": data, forward, optimizer by default; drop forward when
all-to-all expert dispatch runs inside it):

    own_r           = sum of rank r's sync-free phase times
    rank r straggles  iff  own_r > factor * median_r(own)  and  own_r - median(own) > min_excess_ms
    its slow phase  = argmax over phases p of (phase_r,p - median over ranks of phase_p)

Flagged ranks go to the log (warning), to the loggers (straggler/* metrics, every window) and to
<run>/events.jsonl. A rank slow inside backward (or inside all-to-all) is not told apart from the ranks
waiting for it: that needs timers inside the collectives, which the dispatch layer does not expose yet. On
asynchronous devices set sync_device=true to attribute time to the right phase (it synchronises at each mark,
costing a little throughput).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch

from moe_plugin.lightning.events import append_event, events_path
from moe_plugin.parallel.consensus import consensus_group, gather_floats

log = logging.getLogger(__name__)

PHASES = ("data", "forward", "backward", "optimizer")


class StragglerMonitor(pl.Callback):
    def __init__(
        self,
        every_n_steps: int = 50,
        factor: float = 1.3,
        min_excess_ms: float = 10.0,
        sync_free_phases: tuple[str, ...] | list[str] = ("data", "forward", "optimizer"),
        sync_device: bool = False,
        per_rank_metrics_max_world: int = 64,
        events_file: str | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.straggler.every_n_steps={every_n_steps} must be >= 1.")
        if factor <= 1.0:
            raise ValueError(f"callbacks.straggler.factor={factor} must be > 1 (a rank this many times the median).")
        bad = [p for p in sync_free_phases if p not in PHASES]
        if bad or not sync_free_phases:
            raise ValueError(
                f"callbacks.straggler.sync_free_phases={list(sync_free_phases)} must be a non-empty subset of {PHASES}."
            )
        self.every_n_steps = every_n_steps
        self.factor = factor
        self.min_excess_ms = min_excess_ms
        self.sync_free_phases = tuple(sync_free_phases)
        self.sync_device = sync_device
        self.per_rank_metrics_max_world = per_rank_metrics_max_world
        self.events_file = events_file
        self._sums = dict.fromkeys(PHASES, 0.0)
        self._n = 0
        self._marks: dict[str, float] = {}
        self._prev_end: float | None = None
        self._last_window_step = -1
        self.last_report: dict[str, Any] | None = None  # the last window's gathered numbers (for tests/tools)

    def _now(self, pl_module: pl.LightningModule) -> float:
        if self.sync_device and pl_module.device.type != "cpu" and hasattr(torch, "accelerator"):
            torch.accelerator.synchronize()
        return time.perf_counter()

    # -- marks
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = self._now(pl_module)
        self._marks = {"start": now, "data": now - self._prev_end if self._prev_end is not None else 0.0}

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._marks["before_backward"] = self._now(pl_module)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._marks["after_backward"] = self._now(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prev_end = time.perf_counter()  # validation is not a data stall of the next step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        end = self._now(pl_module)
        m = self._marks
        if "start" in m:
            fwd_end = m.get("before_backward", end)
            bwd_end = m.get("after_backward", fwd_end)
            self._sums["data"] += m["data"]
            self._sums["forward"] += fwd_end - m["start"]
            self._sums["backward"] += bwd_end - fwd_end
            self._sums["optimizer"] += end - bwd_end
            self._n += 1
        self._marks = {}
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_window_step and self._n > 0:
            self._last_window_step = step
            self._window(trainer, pl_module)
        self._prev_end = time.perf_counter()

    # -- the window
    def _window(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        local = [self._sums[p] / self._n for p in PHASES]
        self._sums = dict.fromkeys(PHASES, 0.0)
        self._n = 0
        rows = gather_floats(local, pl_module.device, consensus_group(trainer))  # R x 4 phase means, seconds
        report = analyse(rows, self.factor, self.sync_free_phases, self.min_excess_ms)
        report["step"] = trainer.global_step
        self.last_report = report
        for s in report["stragglers"]:
            log.warning(
                "straggler: rank %d spends %.1f ms per step in %s = %.2fx the median %.1f ms (slow phase: %s) at step %d",
                s["rank"], s["own_ms"], "+".join(self.sync_free_phases), s["ratio"], report["median_own_ms"],
                s["slow_phase"], trainer.global_step,
            )  # fmt: skip
        if not trainer.is_global_zero:
            return
        metrics = {
            "straggler/median_own_ms": report["median_own_ms"],
            "straggler/median_step_ms": report["median_step_ms"],
            "straggler/max_step_ms": report["max_step_ms"],
            "straggler/slowest_rank": float(report["slowest_rank"]),
            "straggler/slowest_ratio": report["slowest_ratio"],
            "straggler/flagged": float(len(report["stragglers"])),
        }
        metrics.update({f"straggler/local_{p}_ms": 1e3 * v for p, v in zip(PHASES, rows[0])})
        if len(rows) <= self.per_rank_metrics_max_world:
            metrics.update({f"straggler/rank{r}_own_ms": ms for r, ms in enumerate(report["own_ms"])})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        path = events_path(trainer, self.events_file)
        for s in report["stragglers"]:
            append_event(
                path, "straggler", "straggler", step=trainer.global_step, median_own_ms=report["median_own_ms"], **s
            )


def analyse(
    rows: list[list[float]],
    factor: float,
    sync_free_phases: tuple[str, ...] | list[str] = ("data", "forward", "optimizer"),
    min_excess_ms: float = 0.0,
) -> dict[str, Any]:
    """Flag stragglers in R rows of per-phase mean seconds (order PHASES); pure, for tests and tools."""
    idx = [PHASES.index(p) for p in sync_free_phases]
    steps = [sum(r) for r in rows]
    own = [sum(r[i] for i in idx) for r in rows]
    median_own = statistics.median(own)
    phase_medians = [statistics.median(r[i] for r in rows) for i in range(len(PHASES))]
    slowest = max(range(len(rows)), key=lambda r: own[r])
    stragglers = []
    for r, row in enumerate(rows):
        if median_own > 0 and own[r] > factor * median_own and 1e3 * (own[r] - median_own) > min_excess_ms:
            excess = [row[i] - phase_medians[i] for i in range(len(PHASES))]
            stragglers.append(
                {
                    "rank": r,
                    "own_ms": 1e3 * own[r],
                    "step_ms": 1e3 * steps[r],
                    "ratio": own[r] / median_own,
                    "slow_phase": PHASES[max(range(len(PHASES)), key=lambda i: excess[i])],
                    "phases_ms": {p: 1e3 * v for p, v in zip(PHASES, row)},
                }
            )
    return {
        "step_ms": [1e3 * s for s in steps],
        "own_ms": [1e3 * o for o in own],
        "median_step_ms": 1e3 * statistics.median(steps),
        "median_own_ms": 1e3 * median_own,
        "max_step_ms": 1e3 * max(steps),
        "slowest_rank": slowest,
        "slowest_ratio": own[slowest] / median_own if median_own > 0 else 1.0,
        "stragglers": stragglers,
    }
