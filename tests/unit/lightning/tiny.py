"""A seconds-long in-process training set-up shared by the reliability unit tests (single CPU process)."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch

from moe_plugin.data.datamodule import LMDataModule
from moe_plugin.lightning.module import MoELanguageModule
from moe_plugin.models.decoder import MoEDecoderLM


def corpus(n_docs: int = 12, size: int = 3000) -> list[tuple[str, bytes]]:
    g = torch.Generator().manual_seed(0)
    text = "def f(x):\n    return x + 1\n# a comment about things\n"
    docs = []
    for i in range(n_docs):
        rot = int(torch.randint(0, len(text), (1,), generator=g))
        docs.append((f"doc{i}", ((text[rot:] + text[:rot]) * (size // len(text) + 1))[:size].encode()))
    return docs


def tiny_module(lr: float = 3e-3, warmup_steps: int = 2) -> MoELanguageModule:
    torch.manual_seed(0)
    model = MoEDecoderLM(
        vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, max_seq_len=64,
        norm_head=True, moe={"num_experts": 4, "top_k": 2, "expert_hidden_size": 32},
    )  # fmt: skip
    return MoELanguageModule(model, lr=lr, warmup_steps=warmup_steps, schedule="cosine", total_steps=100)


def tiny_data() -> LMDataModule:
    return LMDataModule(corpus(), seq_len=32, batch_size=4, val_fraction=0.2, seed=1)


def tiny_trainer(callbacks: list[pl.Callback], max_steps: int, tmp_path: Any, **kw: Any) -> pl.Trainer:
    kwargs: dict[str, Any] = dict(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path), use_distributed_sampler=False, gradient_clip_val=1.0,
    )  # fmt: skip
    kwargs.update(kw)
    return pl.Trainer(callbacks=callbacks, **kwargs)


def clone_state(x: Any) -> Any:
    """Deep copy with tensors cloned (optimizer/scheduler state dicts hold live tensors)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone_state(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone_state(v) for v in x)
    return copy.deepcopy(x)


def same_state(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of nested states (NaN == NaN counts as equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(
            a.view(-1).view(torch.uint8) if a.is_floating_point() else a, b.view(-1).view(torch.uint8) if b.is_floating_point() else b
        )  # fmt: skip
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


class Probe(pl.Callback):
    """Records, per batch: step, the batch, state before/after, and the LR the optimizer used."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def _state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {
            "params": clone_state({k: v for k, v in pl_module.state_dict().items()}),
            "optim": clone_state(trainer.optimizers[0].state_dict()),
            "sched": clone_state(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
        }

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # runs after the spike guard (callback order): the LR the update will use
        self.records[-1]["lr_used"] = optimizer.param_groups[0]["lr"]
        self.records[-1]["has_grad"] = any(p.grad is not None for p in pl_module.parameters())
        from moe_plugin.lightning.callbacks.spike import update_rejected

        self.records[-1]["rejected"] = update_rejected(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.records.append({"step": trainer.global_step, "before": self._state(trainer, pl_module)})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.records[-1]["batch"] = batch.detach().clone()
        self.records[-1]["after"] = self._state(trainer, pl_module)
