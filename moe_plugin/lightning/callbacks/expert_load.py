"""ExpertLoad: per-layer expert-load metrics and an expert-load heatmap, for any LightningModule with MoE layers.

Shapes: L MoE layers, E experts per layer, H heatmap snapshots.

Every `log_every_n_steps` optimizer steps, from the counts accumulated by each layer since the last log
(c_E = routed token copies per expert, summed over the window's micro-batches and over all ranks):

    moe/layer{l}/max_over_mean   = max(c) / mean(c)                    (1 = perfect balance)
    moe/layer{l}/cv              = std(c) / mean(c)                    (coefficient of variation)
    moe/layer{l}/dead_experts    = #{e : c_e = 0}
    moe/layer{l}/dropped_fraction= dropped copies / routed copies      (0 when dropless)
    moe/layer{l}/router_entropy  = mean_t -sum_e p_te log p_te          (last micro-batch; log E = uniform)
    moe/layer{l}/balance_loss, moe/layer{l}/z_loss                     (last micro-batch, unscaled)
and the same names without `layer{l}/` aggregated over layers (max for max_over_mean, sum for
dead_experts, mean for the rest). With `log_tokens_per_expert`, also moe/layer{l}/tokens/e{e}.

Cost: the layers keep detached counters (no host sync in the forward; `MoE.stats` keeps running totals
only once this callback switches them on, at train start); this callback does one small all-reduce of an
[L, E] tensor per log, so it is on by default.

Heatmap: every `heatmap_every_n_steps` steps (and at the end of training), a figure with
    left:  layers x experts, load share c_le / mean_e(c_le) over the last heatmap window (1 = balanced)
    right: layers x snapshots, max/mean load of each layer over training
written as PNG to <run folder>/expert_load/step_XXXXXXX.png (run folder = trainer.log_dir, or
trainer.default_root_dir without a logger) and logged as `moe/expert_load_heatmap` (wandb.Image) when a
WandbLogger is attached. The raw snapshots go to <run folder>/expert_load/history.json.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from moe_plugin.layers.moe import MoE, moe_layers


class _Window:
    """Counters of one layer at the start of a window, to diff against the layer's monotonic totals."""

    def __init__(self) -> None:
        self.tokens_E: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None
        self.copies = 0

    def take(self, layer: MoE) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Counts since the previous take (routed per expert, dropped, copies), then restart the window.

        Switches the layer's running totals on (RoutingStats keeps them only while someone reads them)."""
        stats = layer.stats
        stats.track_totals = True
        tokens_E = stats.total_tokens_per_expert_E
        dropped = stats.total_dropped
        if tokens_E is None or dropped is None:
            zeros = torch.zeros(layer.num_experts, dtype=torch.long, device=layer.router.weight.device)
            return zeros, zeros.sum(), 0
        delta_E = tokens_E - self.tokens_E if self.tokens_E is not None else tokens_E.clone()
        delta_dropped = dropped - self.dropped if self.dropped is not None else dropped.clone()
        delta_copies = stats.total_copies - self.copies
        self.tokens_E, self.dropped, self.copies = tokens_E.clone(), dropped.clone(), stats.total_copies
        return delta_E, delta_dropped, delta_copies


class ExpertLoad(Callback):
    def __init__(
        self,
        log_every_n_steps: int = 50,
        heatmap_every_n_steps: int = 500,
        heatmap_at_end: bool = True,
        log_tokens_per_expert: bool = False,
        prefix: str = "moe",
    ) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"callbacks.expert_load.log_every_n_steps={log_every_n_steps} must be >= 1.")
        if heatmap_every_n_steps < 0:
            raise ValueError(
                f"callbacks.expert_load.heatmap_every_n_steps={heatmap_every_n_steps} must be >= 0 (0 = only at end)."
            )
        self.log_every_n_steps = log_every_n_steps
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self.heatmap_at_end = heatmap_at_end
        self.log_tokens_per_expert = log_tokens_per_expert
        self.prefix = prefix
        self.history: list[dict[str, Any]] = []  # heatmap snapshots: step, load share [L][E], max/mean [L]
        self.heatmap_paths: list[str] = []
        self._log_windows: list[_Window] = []
        self._heatmap_windows: list[_Window] = []
        self._last_logged_step = -1
        self._last_heatmap_step = -1
        self._root: str | None = None

    # ---------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # trainer.log_dir broadcasts from rank 0 under DDP-style strategies: resolve it here, on every rank,
        # not later inside a rank-0-only branch (rank 0 alone in a collective crashes or hangs the run).
        self._root = trainer.log_dir or trainer.default_root_dir
        layers = moe_layers(pl_module)
        self._log_windows = [_Window() for _ in layers]
        self._heatmap_windows = [_Window() for _ in layers]
        for windows in (self._log_windows, self._heatmap_windows):
            for w, layer in zip(windows, layers):
                w.take(layer)  # windows start now (counts from before, e.g. a sanity check, are not ours)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_logged_step or step == 0:
            return
        layers = moe_layers(pl_module)
        if not layers:
            return
        if step % self.log_every_n_steps == 0:
            self._last_logged_step = step
            self._log_metrics(trainer, pl_module, layers)
        if self.heatmap_every_n_steps and step % self.heatmap_every_n_steps == 0 and step != self._last_heatmap_step:
            self._snapshot_heatmap(trainer, layers, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layers = moe_layers(pl_module)
        if self.heatmap_at_end and layers and trainer.global_step != self._last_heatmap_step:
            self._snapshot_heatmap(trainer, layers, trainer.global_step)
        if trainer.is_global_zero and self.history:
            with open(os.path.join(self._folder(trainer), "history.json"), "w") as f:
                json.dump(self.history, f)

    # -------------------------------------------------------------------------------------- metrics
    def _window_counts(
        self, trainer: Trainer, layers: list[MoE], windows: list[_Window]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-layer counts over the window, summed over ranks in one all-reduce."""
        if len(windows) != len(layers):  # layers added after on_train_start (or the callback was added late)
            windows[:] = [_Window() for _ in layers]
        taken = [w.take(m) for w, m in zip(windows, layers)]
        E_max = max(m.num_experts for m in layers)
        device = layers[0].router.weight.device
        packed = torch.zeros(len(layers), E_max + 2, dtype=torch.float64, device=device)
        for i, (c_E, dropped, copies) in enumerate(taken):
            packed[i, : c_E.numel()] = c_E.to(device=device, dtype=torch.float64)
            packed[i, E_max] = float(dropped)
            packed[i, E_max + 1] = copies
        packed = trainer.strategy.reduce(packed, reduce_op="sum")
        counts = [packed[i, : m.num_experts] for i, m in enumerate(layers)]
        return counts, packed[:, E_max], packed[:, E_max + 1]

    def _log_metrics(self, trainer: Trainer, pl_module: LightningModule, layers: list[MoE]) -> None:
        counts, dropped_L, copies_L = self._window_counts(trainer, layers, self._log_windows)
        p = self.prefix
        metrics: dict[str, float] = {}
        per_layer: dict[str, list[float]] = {k: [] for k in ("max_over_mean", "cv", "dead_experts", "dropped_fraction")}
        for i, (layer, c_E) in enumerate(zip(layers, counts)):
            mean = c_E.mean().clamp_min(1e-12)
            stats = {
                "max_over_mean": float(c_E.max() / mean),
                "cv": float(c_E.std(unbiased=False) / mean),
                "dead_experts": float((c_E == 0).sum()),
                "dropped_fraction": float(dropped_L[i] / copies_L[i].clamp_min(1.0)),
            }
            for k, v in stats.items():
                per_layer[k].append(v)
                metrics[f"{p}/layer{i}/{k}"] = v
            for k, v in layer.stats.losses.items():
                metrics[f"{p}/layer{i}/{k}"] = float(v)
                per_layer.setdefault(k, []).append(float(v))
            if self.log_tokens_per_expert:
                for e, n in enumerate(c_E.tolist()):
                    metrics[f"{p}/layer{i}/tokens/e{e}"] = n
        for k, values in per_layer.items():
            if not values:
                continue
            if k == "max_over_mean":
                metrics[f"{p}/{k}"] = max(values)
            elif k == "dead_experts":
                metrics[f"{p}/{k}"] = sum(values)
            else:
                metrics[f"{p}/{k}"] = sum(values) / len(values)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # -------------------------------------------------------------------------------------- heatmap
    def _snapshot_heatmap(self, trainer: Trainer, layers: list[MoE], step: int) -> None:
        self._last_heatmap_step = step
        counts, _, _ = self._window_counts(trainer, layers, self._heatmap_windows)
        share = [(c_E / c_E.mean().clamp_min(1e-12)).tolist() for c_E in counts]
        self.history.append(
            {"step": step, "load_share": share, "max_over_mean": [max(row) if row else 0.0 for row in share]}
        )
        if not trainer.is_global_zero:
            return
        path = os.path.join(self._folder(trainer), f"step_{step:07d}.png")
        render_heatmap(self.history, path)
        self.heatmap_paths.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # log_image wraps the PNG in wandb.Image, keyed by global step
                logger.log_image(key=f"{self.prefix}/expert_load_heatmap", images=[path], step=step)

    def _folder(self, trainer: Trainer) -> str:
        """<run folder>/expert_load; the run folder was resolved on every rank in on_train_start (no collective here)."""
        folder = os.path.join(self._root or trainer.default_root_dir, "expert_load")
        os.makedirs(folder, exist_ok=True)
        return folder


def render_heatmap(history: list[dict[str, Any]], path: str) -> None:
    """Two panels: the latest layers x experts load share, and each layer's max/mean over snapshots."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    latest = history[-1]
    share = latest["load_share"]
    L = len(share)
    E = max(len(row) for row in share)
    grid = [[row[e] if e < len(row) else math.nan for e in range(E)] for row in share]
    # A symmetric log colour scale around 1: 4x over- and under-loaded look equally strong. Dead experts
    # (no tokens) are drawn black, below the scale.
    vmax = max(4.0, max((v for row in grid for v in row if v == v), default=1.0))
    norm = LogNorm(vmin=1.0 / vmax, vmax=vmax)
    shown = [[(v if v > 0 else 0.5 / vmax) if v == v else math.nan for v in row] for row in grid]
    cmap = colormaps["RdBu_r"].with_extremes(under="black", bad="lightgrey")

    width_now = min(3 + 0.16 * E, 18)
    width_time = min(3 + 0.3 * len(history), 8)
    fig = Figure(figsize=(width_now + width_time, 1.5 + 0.3 * L), dpi=100)
    FigureCanvasAgg(fig)
    ax_now, ax_time = fig.subplots(1, 2, gridspec_kw={"width_ratios": [width_now, width_time]})
    im = ax_now.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax_now.set_xlabel("expert")
    ax_now.set_ylabel("MoE layer")
    ax_now.set_title(f"tokens / mean tokens per expert, step {latest['step']} (black: dead)")
    ticks = [t for t in (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8) if 1 / vmax <= t <= vmax]
    bar = fig.colorbar(im, ax=ax_now, fraction=0.046, pad=0.02, ticks=ticks)
    bar.ax.set_yticklabels([f"{t:g}" for t in ticks])
    bar.ax.minorticks_off()

    over_time = [[snap["max_over_mean"][layer] for snap in history] for layer in range(L)]
    im2 = ax_time.imshow(over_time, aspect="auto", cmap="magma", interpolation="nearest", vmin=1.0)
    steps = [snap["step"] for snap in history]
    every = max(1, math.ceil(len(steps) / 6))
    ax_time.set_xticks(list(range(0, len(steps), every)), [str(steps[i]) for i in range(0, len(steps), every)])
    ax_time.tick_params(axis="x", labelrotation=45)
    ax_time.set_xlabel("step")
    ax_time.set_ylabel("MoE layer")
    ax_time.set_title("max / mean load over training")
    fig.colorbar(im2, ax=ax_time, fraction=0.046, pad=0.02)
    fig.tight_layout()
    fig.savefig(path)
