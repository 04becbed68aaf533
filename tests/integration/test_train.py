"""train.py end to end through Hydra, in subprocesses (a few steps each)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_smoke_run_writes_summary_checkpoint_and_metrics(train, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = train("experiment=tiny_smoke", "logger=many", f"paths.output_dir={out}", "trainer.max_steps=6")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 64
    assert summary["val_loss"] < math.log(256)
    assert summary["tokens_per_second"] > 0
    assert Path(summary["best_checkpoint"]).exists()
    assert "run summary" in proc.stdout
    rows = list(csv.DictReader((out / "csv" / "version_0" / "metrics.csv").open()))
    keys = set(rows[0])
    assert {"train/loss", "train/lm_loss", "train/aux_loss", "train/balance_loss", "train/z_loss", "val/loss"} <= keys
    # W&B offline run folder with the same metrics in its summary
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    # wandb 0.31 writes protobuf records into the .wandb file (read by `wandb sync`); the metric keys of every
    # logged row are stored in it as plain strings.
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert records.count(b"train/loss") >= 6
    assert b"val/loss" in records and b"summary/steps" in records


def test_bad_config_exits_with_a_named_key(train) -> None:
    proc = train("experiment=tiny_smoke", "logger=none", "model.moe.top_k=99", check=False)
    assert proc.returncode == 2
    assert "model.moe.top_k=99" in proc.stderr


def test_missing_data_path_is_a_clear_error(train, tmp_path: Path) -> None:
    proc = train(
        "experiment=tiny_smoke", "logger=none", "data=text_files", f"data.source.paths=[{tmp_path}/nope]", check=False
    )
    assert proc.returncode != 0
    assert "data.source.paths" in proc.stderr and "does not exist" in proc.stderr


def test_multirun_sweeps_each_value(train, tmp_path: Path) -> None:
    train("-m", "experiment=tiny_smoke", "logger=none", "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path}/sweep")
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2


def test_optuna_sweep_in_memory(train, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    train(
        "-m",
        "hparams_search=optuna",
        "experiment=tiny_smoke",
        "logger=none",
        "hydra.sweeper.n_trials=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        f"hydra.sweep.dir={tmp_path}/optuna",
    )
    results = (tmp_path / "optuna" / "optimization_results.yaml").read_text()
    assert "best_value" in results and "optim.lr" in results


@pytest.mark.parametrize(("every", "fit_vals", "final_extra"), [(3, [3, 6], False), (4, [4], True)])
def test_final_validation_runs_once(train, tmp_path: Path, every: int, fit_vals: list[int], final_extra: bool) -> None:
    """Fit's own validation at the last step is the run's final one (no second pass over the same batches);
    otherwise run() validates the final weights itself. Either way summary.json has the final weights' loss."""
    out = tmp_path / "run"
    train(
        "experiment=tiny_smoke",
        "logger=csv",
        f"paths.output_dir={out}",
        "trainer.max_steps=6",
        f"trainer.val_check_interval={every}",
        "trainer.check_val_every_n_epoch=null",
        "sample_lines=0",
    )
    rows = [r for r in csv.DictReader((out / "csv" / "version_0" / "metrics.csv").open()) if r.get("val/loss")]
    steps = [int(r["step"]) + 1 for r in rows]  # Lightning logs validation at the step index before the increment
    assert steps[: len(fit_vals)] == fit_vals
    assert len(rows) == len(fit_vals) + (1 if final_extra else 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(float(rows[-1]["val/loss"]))
