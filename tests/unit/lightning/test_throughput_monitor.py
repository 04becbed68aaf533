"""ThroughputMonitor: the formulas, and a real CPU fit that logs perf/* and writes throughput.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from moe_plugin.accelerators.catalog import get_device
from moe_plugin.lightning.callbacks.throughput import ThroughputMonitor, _resolve_hardware, count_tokens
from moe_plugin.lightning.module import MoELanguageModule
from moe_plugin.models.decoder import MoEDecoderLM
from moe_plugin.models.inspect import flops_per_token

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "moe": {"num_experts": 4, "top_k": 2, "expert_hidden_size": 32},
}


def test_formulas_over_the_window() -> None:
    cb = ThroughputMonitor(hardware="h100", target_tokens=1e9, window=4)
    cb.spec = get_device("h100")
    cb.flops_per_token = 1e9
    cb._times.extend([10.0, 11.0, 12.0])  # two steps of 1 s
    cb._tokens.extend([999, 4000, 4000])  # the first entry is before the window starts
    m = cb.compute(world_size=2)
    assert m["tokens_per_s"] == 4000.0 and m["tokens_per_s_per_device"] == 2000.0
    assert m["mfu"] == pytest.approx(2000.0 * 1e9 / 989e12)
    assert m["cost_per_1M_tokens"] == pytest.approx(2.99 * 2 / (4000 * 3600) * 1e6)
    assert m["projected_cost"] == pytest.approx(1e9 * m["cost_per_1M_tokens"] / 1e6)
    assert m["projected_days"] == pytest.approx(1e9 / 4000 / 86400)
    assert m["step_time_s"] == 1.0


def test_hardware_from_the_composed_group_with_overrides() -> None:
    node = OmegaConf.create({**get_device("device_d").__dict__, "match": [], "price_per_hour": 20.0})
    spec = _resolve_hardware(node)
    assert spec.name == "device_d" and spec.price_per_hour == 20.0
    if not torch.accelerator.is_available():
        assert _resolve_hardware(OmegaConf.create({"name": "auto"})).name == "cpu"


def test_token_counting_and_bad_arguments() -> None:
    assert count_tokens(torch.zeros(4, 17, dtype=torch.long)) == 64  # [B, S+1] -> B*S predictions
    assert count_tokens({"input_ids": torch.zeros(2, 8)}) == 16
    with pytest.raises(TypeError, match="cannot count tokens"):
        count_tokens("text")
    with pytest.raises(ValueError, match="callbacks.throughput.window=0"):
        ThroughputMonitor(window=0)
    with pytest.raises(ValueError, match="target_tokens=-1"):
        ThroughputMonitor(target_tokens=-1)


@pytest.mark.slow
def test_live_metrics_in_a_real_cpu_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = MoELanguageModule(MoEDecoderLM(**TINY), warmup_steps=1)
    data = torch.randint(0, 64, (24, 17))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    cb = ThroughputMonitor(hardware="cpu", window=3, warmup_steps=1, target_tokens=1e6)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[cb],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=loader)
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    mfu = [float(r["perf/mfu"]) for r in rows if r.get("perf/mfu")]
    assert len(mfu) >= 3 and all(0 < x < 1 for x in mfu)
    summary = json.loads((tmp_path / "throughput.json").read_text())
    assert summary["hardware"] == "cpu" and summary["seq_len"] == 16
    assert summary["flops_per_token"] == flops_per_token(module.model, 16)
    assert summary["tokens_per_s"] > 0 and summary["projected_days"] > 0
    hparams = (Path(trainer.logger.log_dir) / "hparams.yaml").read_text()
    assert "hardware/name: cpu" in hparams


@pytest.mark.slow
def test_mfu_and_cost_reach_the_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    if wandb.run is not None:  # a run left open by an earlier test would receive our metrics
        wandb.finish()
    torch.manual_seed(0)
    module = MoELanguageModule(MoEDecoderLM(**TINY), warmup_steps=1)
    loader = torch.utils.data.DataLoader(torch.randint(0, 64, (16, 17)), batch_size=4)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="moe_plugin_test")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=logger,
        callbacks=[ThroughputMonitor(hardware="device_d", window=2, warmup_steps=1)],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=loader)
    run = logger.experiment
    summary = dict(run.summary)  # the values W&B holds for the run (what `wandb sync` uploads)
    for key in ("perf/mfu", "perf/cost_per_1M_tokens", "perf/projected_cost", "perf/tokens_per_s"):
        assert key in summary and summary[key] > 0, key
    assert run.config["hardware/name"] == "device_d"
    run.finish()
