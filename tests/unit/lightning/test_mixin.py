"""MoEMixin / MoEAuxLoss with a real Trainer: the loss Lightning backpropagates is the user's plus aux."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moe_plugin import MoE, collect_aux_losses, moefy
from moe_plugin.lightning.mixin import MoEAuxLoss, MoEMixin

VOCAB, D = 40, 16


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.mlp = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(x + self.mlp(x))


class Plain(pl.LightningModule):
    """A user's module: returns its task loss and knows nothing about MoE."""

    def __init__(self, upcycle: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = moefy(Net(), num_experts=4, top_k=2, upcycle=upcycle)
        self.task_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self.net(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        self.task_losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        ids = torch.randint(0, VOCAB, (16, 9), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=4)


class WithMixin(MoEMixin, Plain):
    pass


class DictOutput(MoEMixin, Plain):
    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx), "extra": 1}


class Recorder(pl.Callback):
    """What Lightning really backpropagates, and the aux loss present at that moment."""

    def __init__(self) -> None:
        self.backward: list[tuple[float, float]] = []
        self.router_grad: list[float] = []

    def on_before_backward(self, trainer, pl_module, loss):
        aux = collect_aux_losses(pl_module)
        self.backward.append((loss.item(), aux.item()))

    def on_after_backward(self, trainer, pl_module):
        self.router_grad.append(pl_module.net.mlp.router.weight.grad.norm().item())


def _fit(module: pl.LightningModule, steps: int = 3, accumulate: int = 1, callbacks=()) -> Recorder:
    rec = Recorder()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=accumulate,
        callbacks=[rec, *callbacks],
    )
    trainer.fit(module)
    module.logged = dict(trainer.callback_metrics)
    return rec


@pytest.mark.parametrize("accumulate", [1, 2])
def test_mixin_adds_aux_loss_to_what_lightning_backpropagates(accumulate):
    module = WithMixin()
    rec = _fit(module, accumulate=accumulate)
    assert len(rec.backward) == 3 * accumulate
    for (backward_loss, aux), task in zip(rec.backward, module.task_losses):
        assert aux > 0
        assert backward_loss == pytest.approx((task + aux) / accumulate, rel=1e-6)
    assert {"train/aux_loss", "train/balance_loss", "train/z_loss"} <= set(module.logged)


def test_without_mixin_only_the_task_loss_is_backpropagated():
    module = Plain()
    rec = _fit(module)
    for (backward_loss, _), task in zip(rec.backward, module.task_losses):
        assert backward_loss == pytest.approx(task, rel=1e-6)


def test_aux_loss_is_what_trains_the_router_right_after_upcycling():
    # Identical upcycled experts with renormalised top-k: the task loss does not depend on the router,
    # so its gradient there is ~0; the balance loss is what moves the router at the first step.
    rec_plain = _fit(Plain(upcycle=True), steps=1)
    rec_mixin = _fit(WithMixin(upcycle=True), steps=1)
    assert rec_plain.router_grad[0] < 1e-6
    assert rec_mixin.router_grad[0] > 1e-4


def test_dict_output_and_super_call_add_aux_once():
    module = DictOutput()
    rec = _fit(module)
    for (backward_loss, aux), task in zip(rec.backward, module.task_losses):
        assert backward_loss == pytest.approx(task + aux, rel=1e-6)


def test_callback_does_the_same_for_an_untouched_module_class():
    module = Plain()
    rec = _fit(module, callbacks=[MoEAuxLoss()])
    for (backward_loss, aux), task in zip(rec.backward, module.task_losses):
        assert backward_loss == pytest.approx(task + aux, rel=1e-6)
    assert "training_step" not in vars(module)  # unwrapped again after fit
    assert "train/aux_loss" in module.logged


class Manual(MoEMixin, Plain):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimisation_adds_aux_in_manual_backward_once():
    module = Manual()
    rec = _fit(module)
    assert len(rec.backward) == 3
    for (backward_loss, aux), task in zip(rec.backward, module.task_losses):
        assert backward_loss == pytest.approx(task + aux, rel=1e-6)
    assert all(m.aux_loss is None for m in module.modules() if isinstance(m, MoE))  # consumed


def test_unexpected_output_type_is_a_clear_error():
    class Weird(MoEMixin, Plain):
        def training_step(self, batch, batch_idx):
            return (super().training_step(batch, batch_idx),)

    with pytest.raises(TypeError, match="returned tuple; expected a loss tensor"):
        _fit(Weird(), steps=1)


def test_callback_refuses_manual_optimisation():
    class ManualPlain(Plain):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="manual optimisation.*MoEMixin"):
        _fit(ManualPlain(), steps=1, callbacks=[MoEAuxLoss()])


def test_mixin_adds_the_packages_moe_callbacks_once(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from moe_plugin.lightning import callbacks

    module = WithMixin()
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callbacks.ExpertLoad(log_every_n_steps=1)],
    )
    trainer.fit(module)
    load = [c for c in trainer.callbacks if isinstance(c, callbacks.ExpertLoad)]
    assert len(load) == 1 and load[0].log_every_n_steps == 1  # the user's own instance is kept
    assert sum(isinstance(c, callbacks.RouterUpdates) for c in trainer.callbacks) == 1
    header = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0]
    assert "moe/max_over_mean" in header and "train/aux_loss" in header
