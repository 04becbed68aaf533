"""ExpertLoad and RouterUpdates in real (tiny) Lightning runs on CPU, CSV logger and W&B offline, with a
user's own LightningModule that merely contains MoE layers."""

from __future__ import annotations

import csv
import glob
import os

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader

from moe_plugin.layers.moe import MoE, collect_aux_losses
from moe_plugin.lightning.callbacks import ExpertLoad, RouterUpdates

D, E = 8, 4


class UserModel(LightningModule):
    """Not our decoder: two parallel MoE layers on the embeddings, then a head. Token v's embedding is the
    one-hot e_v and router row e is 10 * e_e, so token v is routed to expert v (top-1) in both layers."""

    def __init__(self, lr: float = 0.0, **moe_kw) -> None:
        super().__init__()
        self.embed = nn.Embedding(E, D)
        self.moe1 = MoE(D, num_experts=E, top_k=1, expert_hidden_size=8, **moe_kw)
        self.block = nn.Sequential(MoE(D, num_experts=E, top_k=1, expert_hidden_size=8, **moe_kw))
        self.head = nn.Linear(D, E)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(E, D))
            for m in (self.moe1, self.block[0]):
                m.router.weight.copy_(10 * torch.eye(E, D))
        self.embed.weight.requires_grad_(False)
        self.moe1.router.weight.requires_grad_(False)
        self.block[0].router.weight.requires_grad_(False)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x = self.embed(batch)
        h = self.moe1(x) + self.block(x)
        loss = nn.functional.cross_entropy(self.head(h).flatten(0, 1), batch.flatten())
        return loss + collect_aux_losses(self)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def _trainer(tmp_path, callbacks, max_steps, accumulate=1, wandb=False) -> Trainer:
    loggers = [CSVLogger(str(tmp_path), name="csv")]
    if wandb:
        loggers.append(WandbLogger(save_dir=str(tmp_path), offline=True, project="moe-test"))
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )


@pytest.mark.slow
def test_metrics_heatmap_csv_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # Tokens 0 and 1 only: experts 0 and 1 get 8 tokens each per batch, experts 2 and 3 none.
    batches = [torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]])] * 8
    cb = ExpertLoad(log_every_n_steps=2, heatmap_every_n_steps=3)
    trainer = _trainer(tmp_path, [cb, RouterUpdates()], max_steps=6, wandb=True)
    trainer.fit(UserModel(lr=0.1), DataLoader(batches, batch_size=None))

    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))[0])))
    logged = [r for r in rows if r.get("moe/max_over_mean")]
    assert [int(r["step"]) for r in logged] == [2, 4, 6]
    for r in logged:
        # counts [4k, 4k, 0, 0] -> max/mean 2, dead 2 per layer (4 over both), cv = std/mean = 1
        assert float(r["moe/max_over_mean"]) == pytest.approx(2.0)
        assert float(r["moe/layer0/dead_experts"]) == 2 and float(r["moe/dead_experts"]) == 4
        assert float(r["moe/layer1/cv"]) == pytest.approx(1.0)
        assert float(r["moe/dropped_fraction"]) == 0.0
        assert float(r["moe/layer0/router_entropy"]) < 0.01  # one-hot routing
        assert float(r["moe/layer0/balance_loss"]) == pytest.approx(2.0, rel=1e-3)  # E * 0.5 * ~1
        assert "moe/layer1/z_loss" in r

    pngs = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "csv" / "*" / "expert_load" / "*.png")))
    assert pngs == ["step_0000003.png", "step_0000006.png"]
    assert len(cb.history) == 2 and cb.history[-1]["load_share"][0] == pytest.approx([2.0, 2.0, 0.0, 0.0])
    assert os.path.exists(os.path.join(os.path.dirname(cb.heatmap_paths[0]), "history.json"))
    images = glob.glob(
        str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "**" / "*.png"), recursive=True
    )
    assert len(images) == 2


@pytest.mark.slow
def test_capacity_drops_are_reported(tmp_path):
    batches = [torch.tensor([[0, 0, 0, 0, 0, 0, 1, 2]])] * 4  # expert 0 gets 6 of 8; C = ceil(8/4) = 2
    cb = ExpertLoad(log_every_n_steps=2, heatmap_every_n_steps=0, heatmap_at_end=False)
    trainer = _trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(UserModel(capacity_factor=1.0), DataLoader(batches, batch_size=None))
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))[0])))
    r = [r for r in rows if r.get("moe/dropped_fraction")][0]
    assert float(r["moe/layer0/dropped_fraction"]) == pytest.approx(4 / 8)


@pytest.mark.slow
def test_expert_bias_update_counts_every_micro_batch_of_the_step(tmp_path):
    # Step 1 = two micro-batches: 6 copies to expert 0, then 2 to expert 1. Summed counts [6, 2, 0, 0]
    # (mean 2): sign(mean - c) = [-1, 0, +1, +1]; centred: [-1.25, -0.25, 0.75, 0.75] * rate.
    # Counting only the last micro-batch would give [+, -, +, +] instead.
    batches = [torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)]
    model = UserModel(expert_bias=True, expert_bias_update_rate=0.01)
    trainer = _trainer(tmp_path, [RouterUpdates()], max_steps=1, accumulate=2)
    trainer.fit(model, DataLoader(batches, batch_size=None))
    expected = 0.01 * torch.tensor([-1.25, -0.25, 0.75, 0.75])
    for m in (model.moe1, model.block[0]):
        torch.testing.assert_close(m.router.expert_bias_E, expected)


@pytest.mark.slow
def test_routing_warmup_follows_optimizer_steps_not_micro_batches(tmp_path):
    batches = [torch.tensor([[0, 1, 2, 3]])] * 12
    model = UserModel(routing_warmup=True, routing_warmup_steps=4)
    seen = []
    orig = model.moe1.router.warmup.forward

    def spy(logits, *args):
        seen.append(model.moe1.router.warmup.blend())
        return orig(logits, *args)

    model.moe1.router.warmup.forward = spy
    trainer = _trainer(tmp_path, [RouterUpdates()], max_steps=5, accumulate=2)
    trainer.fit(model, DataLoader(batches, batch_size=None))
    assert seen == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0]
    assert int(model.moe1.router.warmup.step) == 5  # 5 accepted optimizer steps


def test_bad_callback_arguments():
    with pytest.raises(ValueError, match="log_every_n_steps=0"):
        ExpertLoad(log_every_n_steps=0)
    with pytest.raises(ValueError, match="heatmap_every_n_steps=-1"):
        ExpertLoad(heatmap_every_n_steps=-1)
    with pytest.raises(ValueError, match="expert_bias_update_rate=-1"):
        RouterUpdates(expert_bias_update_rate=-1.0)
