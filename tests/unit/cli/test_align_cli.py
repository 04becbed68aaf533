"""moe-plugin align record/compare end to end: exit codes and the PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_plugin.cli.main import main


@pytest.mark.slow
def test_record_compare_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, c, d = (str(tmp_path / f"{n}.json") for n in "abcd")
    batches = str(tmp_path / "batches.pt")
    small = ["--steps", "3", "model.num_layers=1"]
    assert main(["align", "record", "--out", a, "--threads", "1", "--save-batches", batches, *small]) == 0
    assert main(["align", "record", "--out", b, "--threads", "1", "--batches", batches, *small]) == 0
    assert main(["align", "record", "--out", c, "--precision", "bf16-mixed", "--batches", batches, *small]) == 0
    assert main(["align", "record", "--out", d, "--seed", "7", *small]) == 0
    capsys.readouterr()

    assert main(["align", "compare", a, b]) == 0
    assert "ALIGNED" in capsys.readouterr().out
    png = tmp_path / "curves.png"
    assert main(["align", "compare", a, c, "--tolerance-dtype", "fp32", "--png", str(png), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["first_divergence"]["point"] == "layers.0.attention" and out["first_divergence"]["step"] == 0
    assert png.stat().st_size > 10_000
    assert main(["align", "compare", a, d]) == 2
    assert "NOT COMPARABLE" in capsys.readouterr().out


def test_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["align", "compare", str(tmp_path / "nope.json"), str(tmp_path / "nope2.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["align", "record", "--out", str(tmp_path / "x.json"), "hidden_size=3"]) == 2
    assert "expected model.<key>=<value>" in capsys.readouterr().err
