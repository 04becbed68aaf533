"""Config-driven fault injection, for testing the reliability features end to end (off by default).

    python train.py callbacks=fault_injection \
        'callbacks.fault_injection.faults=[{kind: spike, step: 130}, {kind: kill, step: 160, rank: 1}]'

Each fault is a mapping with `kind`, `step` (the value of trainer.global_step when the batch starts; skipped
updates count as steps) and optionally `until` (exclusive end, default step + 1; null = to the end of the run),
`rank` (a global rank or a list of them, default every rank), `scale`, `seconds` and `factor`. Kinds:

    spike     Gaussian noise of std `scale` (default 30) is added to the model's output (logits) for that step:
              the loss jumps far above its recent values (seeded by the step, so a replay spikes identically)
    nan_loss  the model's output is multiplied by NaN: non-finite loss and gradients
    nan_grad  after backward, one gradient element of the first parameter becomes NaN (on `rank` only)
    kill      SIGKILL of the process at the start of the step (like a lost node; nothing is flushed)
    sigterm   SIGTERM to the process at the start of the step (preemption: the step ends, then fit stops)
    raise     a RuntimeError at the start of the step (a crash that Lightning sees)
    sleep     `seconds` of sleep before the forward pass on each step of [step, until) (a straggler)
    delay     the rank runs `factor` (default 3) times slower on each step of [step, until): at the end of the
              batch it sleeps (factor - 1) x the time the batch took (a slower device or island, whatever the model)

`kill`, `sigterm` and `raise` fire once per run folder: a marker file `<run>/fault_injection_fired.json` remembers them,
so a run restarted in the same folder (resume=auto, torchrun --max-restarts) goes past them. The other kinds
are a pure function of the step and fire again if the step is replayed after a resume, exactly as in an
uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

log = logging.getLogger(__name__)

KINDS = ("spike", "nan_loss", "nan_grad", "kill", "sigterm", "raise", "sleep", "delay")
ONCE_KINDS = ("kill", "sigterm", "raise")
MARKER = "fault_injection_fired.json"


class FaultInjector(pl.Callback):
    def __init__(self, faults: Sequence[Mapping[str, Any]] = (), module_attr: str = "model") -> None:
        self.faults: list[dict[str, Any]] = []
        for i, f in enumerate(faults):
            f = dict(f)
            if f.get("kind") not in KINDS:
                raise ValueError(f"callbacks.fault_injection.faults[{i}].kind={f.get('kind')!r} is not one of {KINDS}.")
            if not isinstance(f.get("step"), int) or f["step"] < 0:
                raise ValueError(f"callbacks.fault_injection.faults[{i}].step={f.get('step')!r} must be an int >= 0.")
            f.setdefault("until", f["step"] + 1)
            f.setdefault("rank", None)
            f.setdefault("scale", 30.0)
            f.setdefault("seconds", 0.5)
            f.setdefault("factor", 3.0)
            if f["kind"] == "delay" and not float(f["factor"]) >= 1.0:
                raise ValueError(
                    f"callbacks.fault_injection.faults[{i}].factor={f['factor']!r} must be >= 1 (slowdown)."
                )
            if f["until"] is None:
                f["until"] = float("inf")
            f["id"] = i
            self.faults.append(f)
        self.module_attr = module_attr
        self._hooks: list[Any] = []
        self.fired: list[dict[str, Any]] = []  # (step, kind) actually injected in this process
        self._batch_start: float | None = None
        self._batch_step = 0

    def _active(self, trainer: pl.Trainer, kinds: Sequence[str]) -> list[dict[str, Any]]:
        return self._active_at(trainer, kinds, trainer.global_step)

    def _active_at(self, trainer: pl.Trainer, kinds: Sequence[str], step: int) -> list[dict[str, Any]]:
        return [
            f
            for f in self.faults
            if f["kind"] in kinds and f["step"] <= step < f["until"] and _targets(f["rank"], trainer.global_rank)
        ]

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        return getattr(pl_module, self.module_attr, pl_module)

    def _marker(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir) / MARKER

    def _already_fired(self, trainer: pl.Trainer, fault: dict[str, Any]) -> bool:
        path = self._marker(trainer)
        return path.exists() and fault["id"] in json.loads(path.read_text() or "[]")

    def _mark_fired(self, trainer: pl.Trainer, fault: dict[str, Any]) -> None:
        path = self._marker(trainer)
        fired = json.loads(path.read_text() or "[]") if path.exists() else []
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            json.dump(sorted(set(fired) | {fault["id"]}), f)
            f.flush()
            os.fsync(f.fileno())

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start, self._batch_step = time.perf_counter(), trainer.global_step
        for f in self._active(trainer, ONCE_KINDS):
            if self._already_fired(trainer, f):
                continue
            self._mark_fired(trainer, f)
            log.warning(
                "fault injection: %s at step %d on rank %d", f["kind"], trainer.global_step, trainer.global_rank
            )
            if f["kind"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if f["kind"] == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # handled by Lightning: the step finishes, then fit stops
                continue
            raise RuntimeError(f"injected fault at step {trainer.global_step} (callbacks.fault_injection)")
        for f in self._active(trainer, ("spike", "nan_loss", "sleep")):
            self.fired.append({"step": trainer.global_step, "kind": f["kind"]})
            target = self._target(pl_module)
            if f["kind"] == "sleep":
                seconds = float(f["seconds"])
                self._hooks.append(target.register_forward_pre_hook(lambda m, a, s=seconds: time.sleep(s)))
            else:
                nan = f["kind"] == "nan_loss"
                scale, step = float(f["scale"]), trainer.global_step
                hook = functools.partial(_corrupt_hook, nan=nan, scale=scale, step=step)
                self._hooks.append(target.register_forward_hook(hook))

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for f in self._active(trainer, ("nan_grad",)):
            self.fired.append({"step": trainer.global_step, "kind": f["kind"]})
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for hook in self._hooks:  # a step without backward (training_step returned None)
            hook.remove()
        self._hooks = []
        if self._batch_start is not None:
            took = time.perf_counter() - self._batch_start
            for f in self._active_at(trainer, ("delay",), self._batch_step):  # the step the batch started at
                self.fired.append({"step": self._batch_step, "kind": "delay"})
                time.sleep((float(f["factor"]) - 1.0) * took)


def _targets(rank: Any, global_rank: int) -> bool:
    """A fault's `rank`: None (every rank), one global rank, or a list of them."""
    if rank is None:
        return True
    if isinstance(rank, (list, tuple)) or (isinstance(rank, Sequence) and not isinstance(rank, str)):
        return global_rank in [int(r) for r in rank]
    return int(rank) == global_rank


def _corrupt_hook(module: nn.Module, args: Any, out: Any, nan: bool, scale: float, step: int) -> Any:
    return _corrupt(out, nan, scale, step)


def _corrupt(out: Any, nan: bool, scale: float, step: int) -> Any:
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        if nan:
            return out * float("nan")
        g = torch.Generator().manual_seed(step)
        return out + scale * torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    if isinstance(out, (tuple, list)):
        return type(out)(_corrupt(o, nan, scale, step) for o in out)
    return out
