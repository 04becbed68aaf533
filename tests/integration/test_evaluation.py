"""Evaluation in the lightning-hydra-template convention: `test=true` after training, and
`train=false test=true ckpt_path=...` on a saved checkpoint or an imported Hugging Face model; sampled lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_test_after_training_then_from_checkpoint(train, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = train("experiment=tiny_smoke", "logger=csv", f"paths.output_dir={out}", "trainer.max_steps=4", "test=true")
    m = json.loads((out / "test_metrics.json").read_text())
    assert m["test/split"] == "test" and m["test/tokens"] > 0 and m["test/tokens_per_second"] > 0
    assert m["test/perplexity"] == pytest.approx(math.exp(m["test/loss"]))
    assert m["test/bits_per_byte"] == pytest.approx(m["test/loss"] / math.log(2))  # byte tokenizer
    assert "test (test split)" in proc.stdout and "sample" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["samples"]) == 3 and summary["test/loss"] == m["test/loss"]
    assert "test/perplexity" in (out / "csv" / "version_0" / "metrics.csv").read_text()

    # the saved checkpoint evaluated alone: the same weights, the same test loss (model config from the file)
    ckpt = summary["best_checkpoint"]
    again = tmp_path / "eval"
    train(
        "experiment=tiny_smoke",
        "logger=none",
        f"paths.output_dir={again}",
        "train=false",
        "test=true",
        f"ckpt_path={ckpt}",
    )
    m2 = json.loads((again / "test_metrics.json").read_text())
    assert m2["test/loss"] == pytest.approx(m["test/loss"], rel=1e-5)


def test_eval_needs_a_checkpoint(train) -> None:
    proc = train("experiment=tiny_smoke", "logger=none", "train=false", "test=true", check=False)
    assert proc.returncode == 2 and "ckpt_path" in proc.stderr


def test_datamodule_test_split_is_disjoint() -> None:
    from moe_plugin.data.datamodule import LMDataModule

    docs = [(f"doc{i}", bytes([65 + i % 26]) * 300) for i in range(200)]
    dm = LMDataModule(docs, seq_len=16, batch_size=4, val_fraction=0.1, test_fraction=0.1)
    dm.setup()
    assert dm.test_set is not None and dm.stats["test_bytes"] == dm.stats["test_tokens"]
    total = dm.stats["train_tokens"] + dm.stats["val_tokens"] + dm.stats["test_tokens"]
    assert total == 200 * 300
    assert torch.is_tensor(next(iter(dm.test_dataloader())))
    with pytest.raises(ValueError, match="data.test_fraction"):
        LMDataModule(docs, val_fraction=0.5, test_fraction=0.6)
