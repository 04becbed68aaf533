"""Throughput, MFU and cost per token, logged live during training (to W&B and every other logger).

Per logged step, over a sliding window of the last `window` optimizer steps (the first `warmup_steps`
are skipped: compilation, allocator warm-up):
    tokens_per_s            = tokens of the window (all ranks) / wall time of the window
    tokens_per_s_per_device = tokens_per_s / world_size
    mfu                     = tokens_per_s_per_device * F / peak        F = flops_per_token(model, S)
    cost_per_1M_tokens      = price_per_hour * world_size / (tokens_per_s * 3600) * 1e6
    projected_cost          = target_tokens * cost_per_1M_tokens / 1e6
    projected_days          = target_tokens / tokens_per_s / 86400     (at the current world size)
F is models/inspect.flops_per_token: 6 x (activated non-embedding params) + attention FLOPs at the
batch's sequence length, the same definition `moe-plugin inspect` and `moe-plugin cost` use.
peak and price come from the `hardware` group (catalog entry, overridable); for the host CPU the
peak is measured (fp32 matmul) since no catalog figure applies.

At the end of fit, rank 0 writes `throughput.json` to the run directory: `moe-plugin cost
--measured <run>/throughput.json` ranks the catalog using this measured throughput.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from moe_plugin.accelerators.catalog import DeviceSpec, auto_device, get_device, spec_from_mapping
from moe_plugin.models.inspect import flops_per_token


def _resolve_hardware(hardware: Any) -> DeviceSpec:
    """A catalog name, `auto`, or a mapping (the composed `hardware` group, possibly overridden)."""
    if isinstance(hardware, DeviceSpec):
        return hardware
    if hardware is None or hardware == "auto":
        return auto_device()
    if isinstance(hardware, str):
        return get_device(hardware)
    data = dict(hardware)
    if data.get("name") == "auto":
        spec = auto_device()
        extra = {k: v for k, v in data.items() if k != "name"}
        return spec_from_mapping({**spec.__dict__, **extra}) if extra else spec
    return spec_from_mapping(data)


def count_tokens(batch: Any) -> int:
    """Predicted tokens in one rank's batch: [B, S+1] token ids give B*S (the data module's format)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0] * (batch.shape[1] - 1)) if batch.dim() == 2 else int(batch.numel())
    if isinstance(batch, dict) and "input_ids" in batch:
        return int(batch["input_ids"].numel())
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].numel())
    raise TypeError(f"ThroughputMonitor cannot count tokens in a batch of type {type(batch).__name__}.")


def _seq_len(batch: Any) -> int:
    t = batch if isinstance(batch, torch.Tensor) else batch["input_ids"] if isinstance(batch, dict) else batch[0]
    return int(t.shape[-1] - 1) if isinstance(batch, torch.Tensor) else int(t.shape[-1])


class ThroughputMonitor(pl.Callback):
    def __init__(
        self,
        hardware: Any = "auto",
        target_tokens: float = 1e12,
        window: int = 20,
        warmup_steps: int = 2,
        log_every_n_steps: int = 1,
        prefix: str = "perf/",
        summary_file: str | None = "throughput.json",
    ) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"callbacks.throughput.window={window} must be >= 1.")
        if warmup_steps < 0:
            raise ValueError(f"callbacks.throughput.warmup_steps={warmup_steps} must be >= 0.")
        if not target_tokens > 0:
            raise ValueError(f"callbacks.throughput.target_tokens={target_tokens} must be > 0 (e.g. 1e12).")
        self.hardware_cfg = hardware
        self.target_tokens = float(target_tokens)
        self.window = window
        self.warmup_steps = warmup_steps
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.prefix = prefix
        self.summary_file = summary_file
        self.spec: DeviceSpec | None = None
        self.flops_per_token: float | None = None
        self.seq_len: int | None = None
        self._times: deque[float] = deque(maxlen=window + 1)
        self._tokens: deque[int] = deque(maxlen=window + 1)
        self._steps_seen = 0
        self.last: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.spec = _resolve_hardware(self.hardware_cfg)
        peak = self.spec.peak_flops  # measured once here for the host CPU, not inside the step loop
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {
                    "hardware/name": self.spec.name,
                    "hardware/peak_tflops": peak / 1e12,
                    "hardware/price_per_hour": self.spec.price_per_hour,
                    "hardware/currency": self.spec.currency,
                    "hardware/devices": trainer.world_size,
                }
            )

    def _model(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        return getattr(pl_module, "model", pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.flops_per_token is None:
            self.seq_len = _seq_len(batch)
            self.flops_per_token = float(flops_per_token(self._model(pl_module), self.seq_len))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()  # time what the device did, not what was queued
        self._steps_seen += 1
        if self._steps_seen <= self.warmup_steps:
            return
        self._times.append(time.perf_counter())
        self._tokens.append(count_tokens(batch) * trainer.world_size)
        if len(self._times) < 2 or trainer.global_step % self.log_every_n_steps:
            return
        metrics = self.compute(trainer.world_size)
        pl_module.log_dict(
            {self.prefix + k: v for k, v in metrics.items()}, on_step=True, on_epoch=False, rank_zero_only=True
        )

    def compute(self, world_size: int) -> dict[str, float]:
        """Metrics over the window: tokens after the first timestamp over the time since it."""
        assert self.spec is not None and self.flops_per_token is not None
        elapsed = self._times[-1] - self._times[0]
        tokens = sum(list(self._tokens)[1:])
        tps = tokens / elapsed if elapsed > 0 else 0.0
        tps_dev = tps / world_size
        price_total = self.spec.price_per_hour * world_size
        metrics = {
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps_dev,
            "mfu": tps_dev * self.flops_per_token / self.spec.peak_flops,
            "step_time_s": elapsed / (len(self._times) - 1),
        }
        if tps > 0:
            per_1m = price_total / (tps * 3600.0) * 1e6
            metrics.update(
                cost_per_1M_tokens=per_1m,
                projected_cost=self.target_tokens * per_1m / 1e6,
                projected_days=self.target_tokens / tps / 86400.0,
            )
        self.last = metrics
        return metrics

    def summary(self, world_size: int) -> dict[str, Any]:
        assert self.spec is not None
        return {
            "hardware": self.spec.name,
            "peak_tflops": self.spec.peak_flops / 1e12,
            "price_per_hour": self.spec.price_per_hour,
            "currency": self.spec.currency,
            "world_size": world_size,
            "seq_len": self.seq_len,
            "flops_per_token": self.flops_per_token,
            "target_tokens": self.target_tokens,
            **self.last,
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.summary_file or not self.last or not trainer.is_global_zero:
            return
        out = Path(trainer.default_root_dir) / self.summary_file
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.summary(trainer.world_size), indent=2))
