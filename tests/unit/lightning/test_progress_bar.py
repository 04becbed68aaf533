"""The progress bar says "Epoch 0", not "Epoch 0/-2", and shows no "v_num"; build_trainer installs it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from moe_plugin.lightning.callbacks.progress import MoERichProgressBar, MoETQDMProgressBar, default_progress_bar


def test_no_negative_epoch_limit_and_no_version(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import RichProgressBar

    for bar_cls in (MoERichProgressBar, MoETQDMProgressBar):
        bar = bar_cls()
        trainer = pl.Trainer(max_steps=5, max_epochs=-1, logger=CSVLogger(tmp_path), callbacks=[bar], devices=1)
        bar._trainer = trainer
        module = pl.LightningModule()
        module.trainer = trainer  # type: ignore[misc]
        metrics = bar.get_metrics(trainer, module)
        assert "v_num" not in metrics, metrics
        assert "v_num" in super(bar_cls, bar).get_metrics(trainer, module)  # what Lightning shows
    rich = MoERichProgressBar()
    rich._trainer = pl.Trainer(max_steps=5, max_epochs=-1, logger=False, callbacks=[rich], devices=1)
    assert rich._get_train_description(0).strip() == "Epoch 0"
    assert "/-2" in RichProgressBar._get_train_description(rich, 0)  # Lightning's own text for max_epochs=-1
    rich._trainer = pl.Trainer(max_epochs=3, logger=False, callbacks=[rich], devices=1)
    assert rich._get_train_description(1).strip() == "Epoch 1/2"  # with an epoch limit, Lightning's text


def test_build_trainer_installs_the_bar() -> None:
    from moe_plugin.cli.compose import compose_config
    from moe_plugin.lightning.trainer import build_trainer

    cfg = compose_config(["trainer.enable_progress_bar=true", "trainer.default_root_dir=."])
    trainer = build_trainer(cfg, [], [])
    assert isinstance(trainer.progress_bar_callback, type(default_progress_bar()))
