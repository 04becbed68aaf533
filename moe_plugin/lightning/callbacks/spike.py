"""Loss-spike guard: skip the update on a spike or a non-finite loss/gradient, retry the batch, lower the LR.

The rule (Ling report, ../shared/PAPER.md section 3; detector from Ant's EDiT code, see spike_detector.py):

    per optimizer step:  L = loss averaged over ranks and micro-batches,  g = gradient norm (before clipping)
    spike  = not finite(L, g)  or  z_EWMA(L) > threshold  or  z_EWMA(log g) > grad_norm_threshold
    attempt a of a batch (a = 0 the first time it is trained on):
      no spike                       -> apply the update; fold L and log g into the detectors
      non-finite                     -> skip; retry the batch while a < max_retries, then drop it
      spike and a < max_retries      -> skip; the batch is trained on again (action=retry: next step;
                                        action=reinject: after a random 1..reinject_window later batches)
      spike and a == max_retries     -> apply the update with lr * lr_factor for this one step
    K = max_consecutive_failures skipped steps in a row -> save a checkpoint and stop with TrainingDiverged.

"Skip" leaves the optimizer AND the LR scheduler bit-for-bit unchanged: every gradient is set to None in
`on_before_optimizer_step` (torch optimizers ignore parameters without a gradient: no moment update, no step
count, no weight decay) and the scheduler state and param-group LRs saved there are put back in
`on_train_batch_end`, after Lightning stepped the scheduler. `trainer.global_step` still counts the attempt
(Lightning counts optimizer.step() calls), so `trainer.max_steps` bounds attempts; the LR schedule counts
applied updates.

Retry without touching the LightningModule: the data loader yields a fresh batch tensor every step, so in
`on_train_batch_start` the guard copies a held batch INTO the incoming one (same shape) and holds the incoming
one instead. No sample is lost: held batches are trained on, in order, in the following steps, and they are
saved in the checkpoint (this callback's state) together with the detector statistics.

Every rank takes the same decision: L, g and the non-finite flag are averaged over ranks with one
all-reduce (moe_plugin.parallel.consensus) before deciding. Under expert parallelism g is the mean of the
ranks' local norms, not the exact global norm; it is the same on every rank, which is what matters here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from moe_plugin.lightning.callbacks.spike_detector import EWMAZScore
from moe_plugin.lightning.events import append_event, events_path
from moe_plugin.parallel.consensus import consensus_group, mean_over_ranks

log = logging.getLogger(__name__)

ACTIONS = ("retry", "reinject", "skip")


def update_rejected(trainer: pl.Trainer) -> bool:
    """True when a LossSpikeGuard rejected this step's update (ask it in on_before_optimizer_step of a callback
    placed after the guard, e.g. to skip other per-step state changes such as an expert-bias update)."""
    return any(isinstance(cb, LossSpikeGuard) and cb.rejected for cb in trainer.callbacks)


class TrainingDivergedError(RuntimeError):
    """Too many consecutive optimizer steps were skipped; the message names the saved checkpoint."""


@dataclass
class _Held:
    batch: Any  # CPU copy of a batch (tensor or collection of tensors)
    attempts: int  # how many times it was already trained on and rejected
    wait: int  # fresh batches to let through before it is due


def _map_tensors(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


def _same_shapes(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_shapes(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_shapes(x, y) for x, y in zip(a, b))
    return False


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_into(d, s)


def _cpu_copy(batch: Any) -> Any:
    return _map_tensors(batch, lambda t: t.detach().to("cpu", copy=True))


class LossSpikeGuard(pl.Callback):
    """Detect loss spikes and non-finite steps, skip their update, retry the batch (see module docstring)."""

    def __init__(
        self,
        alpha: float = 0.02,
        warmup_steps: int = 120,
        threshold: float = 3.0,
        grad_norm_threshold: float | None = 4.0,
        action: str = "retry",
        max_retries: int = 1,
        lr_factor: float = 0.5,
        reinject_window: int = 16,
        max_consecutive_failures: int = 8,
        events_file: str | None = None,
        seed: int = 0,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"callbacks.spike.action={action!r} is not one of {ACTIONS}.")
        if max_retries < 0:
            raise ValueError(f"callbacks.spike.max_retries={max_retries} must be >= 0 (0: never retry).")
        if not 0.0 < lr_factor <= 1.0:
            raise ValueError(f"callbacks.spike.lr_factor={lr_factor} must be in (0, 1], e.g. 0.5.")
        if reinject_window < 1:
            raise ValueError(f"callbacks.spike.reinject_window={reinject_window} must be >= 1.")
        if max_consecutive_failures < 1:
            raise ValueError(f"callbacks.spike.max_consecutive_failures={max_consecutive_failures} must be >= 1.")
        if grad_norm_threshold is not None and grad_norm_threshold <= 0:
            raise ValueError(f"callbacks.spike.grad_norm_threshold={grad_norm_threshold} must be positive or null.")
        self.loss_detector = EWMAZScore(alpha, warmup_steps, threshold)
        self.grad_detector = (
            EWMAZScore(alpha, warmup_steps, grad_norm_threshold) if grad_norm_threshold is not None else None
        )
        self.action = action
        self.max_retries = max_retries
        self.lr_factor = lr_factor
        self.reinject_window = reinject_window
        self.max_consecutive_failures = max_consecutive_failures
        self.events_file = events_file
        self.seed = seed
        # persistent state (in the checkpoint)
        self.held: list[_Held] = []
        self.consecutive_failures = 0
        self.counts = {"skipped": 0, "retried": 0, "reinjected": 0, "dropped": 0, "lowered_lr": 0, "nonfinite": 0}
        # per-step scratch
        self._step_batches: list[tuple[Any, int]] = []  # (batch on device, attempts) since the last optimizer step
        self._loss_sum = 0.0
        self._decision: dict[str, Any] | None = None
        self._restore: tuple[list[dict[str, Any]], list[float]] | None = None
        self._last_z = 0.0
        self._stepped = False
        self.rejected = False  # this step's update was skipped (valid from on_before_optimizer_step on)

    # ---------------------------------------------------------------- batch substitution
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        attempts = 0
        ready = next((i for i, h in enumerate(self.held) if h.wait <= 0), None)
        if ready is not None and _same_shapes(self.held[ready].batch, batch):
            item = self.held.pop(ready)
            # the fresh batch waits its turn: it is due as soon as everything held before it was trained on
            self.held.append(_Held(_cpu_copy(batch), 0, 0))
            _copy_into(batch, item.batch)
            attempts = item.attempts
        elif ready is not None:
            log.warning("spike guard: a held batch has another shape than the incoming one; it waits.")
        for h in self.held:
            h.wait = max(0, h.wait - 1)
        self._step_batches.append((batch, attempts))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # Lightning passes the loss already divided by accumulate_grad_batches: the sum is the step's mean loss.
        self._loss_sum += float(loss.detach().float().item())

    # ---------------------------------------------------------------- decision
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        self.rejected = False
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # FSDP2 (strategy.data_parallel_shard_size > 1): gradients are DTensors on several meshes; use the shards
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        local_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        local_bad = not (math.isfinite(self._loss_sum) and math.isfinite(local_norm))
        loss, gnorm, bad = mean_over_ranks(
            [self._loss_sum, local_norm, float(local_bad)], pl_module.device, consensus_group(trainer)
        )
        nonfinite = bad > 0 or not (math.isfinite(loss) and math.isfinite(gnorm))
        log_g = math.log(gnorm) if gnorm > 0 and math.isfinite(gnorm) else 0.0
        z = self.loss_detector.zscore(loss) if not nonfinite else math.inf
        z_grad = self.grad_detector.zscore(log_g) if self.grad_detector is not None and not nonfinite else 0.0
        loss_spike = not nonfinite and self.loss_detector.is_spike(loss)
        grad_spike = not nonfinite and self.grad_detector is not None and self.grad_detector.is_spike(log_g)
        attempts = max((a for _, a in self._step_batches), default=0)
        self._last_z = z if math.isfinite(z) else self._last_z

        if not (nonfinite or loss_spike or grad_spike):
            self.loss_detector.update(loss)
            if self.grad_detector is not None and gnorm > 0:
                self.grad_detector.update(log_g)
            self.consecutive_failures = 0
            self._decision = None
            return

        reason = "nonfinite" if nonfinite else ("loss" if loss_spike else "grad_norm")
        if not nonfinite and attempts >= self.max_retries and self.action != "skip":
            action = "lower_lr"
            self._scale_lr_for_this_step(optimizer)
            self.consecutive_failures = 0
            self.counts["lowered_lr"] += 1
        else:
            self._skip_update(trainer, optimizer)
            self.rejected = True
            self.consecutive_failures += 1
            self.counts["skipped"] += 1
            self.counts["nonfinite"] += int(nonfinite)
            if self.action == "skip" or attempts >= self.max_retries:
                action = "drop"
                self.counts["dropped"] += 1
            else:
                action = self.action
                self.counts["retried" if action == "retry" else "reinjected"] += 1
        self._decision = {
            "event": action,
            "step": trainer.global_step,
            "reason": reason,
            "loss": loss,
            "z": z,
            "grad_norm": gnorm,
            "z_grad": z_grad,
            "attempt": attempts,
            "lr_scale": self.lr_factor if action == "lower_lr" else 1.0,
            "consecutive_failures": self.consecutive_failures,
        }

    def _skip_update(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # torch optimizers leave parameters without a gradient (and their state) untouched
        self._restore = (
            [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs],
            [g["lr"] for g in optimizer.param_groups],
        )

    def _scale_lr_for_this_step(self, optimizer: torch.optim.Optimizer) -> None:
        original = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * self.lr_factor
        handle = None

        def restore(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # right after this update, before the scheduler (chainable schedulers read group["lr"])
            for g, lr in zip(opt.param_groups, original):
                g["lr"] = lr
            assert handle is not None
            handle.remove()

        handle = optimizer.register_step_post_hook(restore)

    # ---------------------------------------------------------------- after the step
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stepped:  # the last micro-batch of an optimizer step (gradient accumulation)
            self._stepped = False
            self._finish_step(trainer, pl_module)

    def _finish_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        decision, self._decision = self._decision, None
        if self._restore is not None:
            sched_states, lrs = self._restore
            for cfg, state in zip(trainer.lr_scheduler_configs, sched_states):
                cfg.scheduler.load_state_dict(state)
            for opt in trainer.optimizers:
                for g, lr in zip(opt.param_groups, lrs):
                    g["lr"] = lr
            self._restore = None
        if decision is not None and decision["event"] in ("retry", "reinject"):
            self._requeue(decision, trainer.global_step)
        self._step_batches, self._loss_sum = [], 0.0
        pl_module.log("spike/loss_z", self._last_z, batch_size=1)
        for key in ("skipped", "lowered_lr", "nonfinite"):
            pl_module.log(f"spike/{key}_total", float(self.counts[key]), batch_size=1)
        if decision is None:
            return
        self._report(trainer, decision)
        if self.consecutive_failures >= self.max_consecutive_failures:
            self._stop(trainer, decision)

    def _requeue(self, decision: dict[str, Any], step: int) -> None:
        wait = 0
        if decision["event"] == "reinject":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            wait = int(torch.randint(1, self.reinject_window + 1, (1,), generator=g))
        items = [_Held(_cpu_copy(b), a + 1, wait) for b, a in self._step_batches]
        # retried batches go before anything already held; reinjected ones after it, once their wait is over
        self.held = items + self.held if decision["event"] == "retry" else self.held + items

    def _report(self, trainer: pl.Trainer, d: dict[str, Any]) -> None:
        msg = (
            f"spike guard: step {d['step']}: {d['reason']} (loss {d['loss']:.4g}, z {d['z']:.3g}, grad norm "
            f"{d['grad_norm']:.4g}, z_grad {d['z_grad']:.3g}, attempt {d['attempt']}) -> {d['event']}"
        )
        log.warning(msg)
        if trainer.is_global_zero:
            append_event(events_path(trainer, self.events_file), "spike_guard", **d)
            metrics = {f"spike/event_{k}": float(d[k]) for k in ("loss", "z", "grad_norm", "attempt", "lr_scale")}
            metrics["spike/event_skipped"] = float(d["event"] not in ("lower_lr",))
            metrics = {k: v if math.isfinite(v) else -1.0 for k, v in metrics.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _stop(self, trainer: pl.Trainer, d: dict[str, Any]) -> None:
        cb = trainer.checkpoint_callback
        folder = Path(getattr(cb, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints")
        path = folder / f"diverged-step{trainer.global_step:06d}.ckpt"
        # weights and optimizer are those of the last applied (good) update
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            append_event(
                events_path(trainer, self.events_file), "spike_guard", "stop", step=d["step"], checkpoint=str(path)
            )
        raise TrainingDivergedError(
            f"{self.consecutive_failures} consecutive optimizer steps were rejected (last: {d['reason']} at step "
            f"{d['step']}, loss {d['loss']:.4g}); stopping (callbacks.spike.max_consecutive_failures="
            f"{self.max_consecutive_failures}). The last good state is saved at {path}. Look at "
            f"{events_path(trainer, self.events_file)}, then lower optim.lr or fix the data and resume with "
            f"ckpt_path={path}."
        )

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_detector": self.loss_detector.state_dict(),
            "grad_detector": self.grad_detector.state_dict() if self.grad_detector is not None else None,
            "held": [{"batch": h.batch, "attempts": h.attempts, "wait": h.wait} for h in self.held],
            "consecutive_failures": self.consecutive_failures,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loss_detector.load_state_dict(state_dict["loss_detector"])
        if self.grad_detector is not None and state_dict.get("grad_detector"):
            self.grad_detector.load_state_dict(state_dict["grad_detector"])
        self.held = [_Held(h["batch"], int(h["attempts"]), int(h["wait"])) for h in state_dict.get("held", [])]
        self.consecutive_failures = int(state_dict.get("consecutive_failures", 0))
        self.counts.update(state_dict.get("counts", {}))
