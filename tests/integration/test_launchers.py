"""Launchers and sweeps: the SLURM expert-parallel preset run through submitit's local executor (2 tasks on
gloo: the same launcher config, no cluster), and the W&B sweep file's command rendered as `wandb agent` does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

TINY = [
    "accelerator=cpu",
    "trainer=debug",
    "logger=csv",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.head_dim=8",
    "model.moe.expert_hidden_size=32",
    "model.moe.shared_expert_hidden_size=32",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.source.max_bytes=200000",
]


def test_slurm_preset_through_submitit_local(train, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    train(
        "-m",
        "experiment=slurm_expert_parallel",
        "hydra/launcher=submitit_local",  # same wiring, local processes instead of sbatch/srun
        "hydra.launcher.nodes=1",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.timeout_min=10",
        "strategy.expert_parallel_size=2",
        "trainer.max_steps=2",
        f"hydra.sweep.dir={sweep}",
        *TINY,
        timeout=600,
    )
    summaries = list(sweep.rglob("summary.json"))
    assert len(summaries) == 1, list(sweep.rglob("*"))
    summary = json.loads(summaries[0].read_text())
    assert summary["steps"] == 2
    # two tasks trained one model: 2 ranks x batch 4 x 32 tokens per step (trainer.devices from tasks_per_node)
    assert summary["tokens"] == 2 * 2 * 4 * 32


def test_wandb_sweep_file_renders_to_a_working_command(train, tmp_path: Path) -> None:
    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "sweeps" / "wandb.yaml").read_text())
    assert spec["program"] == "train.py" and spec["metric"]["name"] == "val/loss"
    assert "${args_no_hyphens}" in spec["command"]
    rng = random.Random(0)
    args = []
    for key, p in spec["parameters"].items():  # one sample, rendered key=value as ${args_no_hyphens} does
        value = p["value"] if "value" in p else rng.choice(p["values"]) if "values" in p else p["min"]
        args.append(f"{key}={value}")
    out = tmp_path / "run"
    args = [a for a in args if not a.startswith("trainer.max_steps")] + ["trainer.max_steps=2"]
    train(*args, *TINY, f"paths.output_dir={out}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] is not None  # the sweep's metric exists
