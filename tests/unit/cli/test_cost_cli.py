"""moe-plugin cost: the paper's figure, the ranking, measured mode, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_plugin.cli.main import main


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_ling_plus_on_device_d_reproduces_the_papers_figure(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(
        capsys, ["cost", "model=ling_plus", "hardware=device_d", "mfu=0.21", "tokens=1e12", "attention=false", "--json"]
    )
    # 6 x 28.3B activated non-embedding params (the report counts 28.8B activated): 6.25M vs "about 6.35M".
    assert out["cost"] == pytest.approx(6.35e6, rel=0.02)
    assert out["currency"] == "RMB" and out["mfu"] == 0.21
    assert out["flops_per_token"] == pytest.approx(6 * (out["active_params"] - 126464 * 5376))


def test_attention_flops_follow_inspect(capsys: pytest.CaptureFixture[str]) -> None:
    with_attn = _json(capsys, ["cost", "model=ling_plus", "hardware=device_d", "--json"])
    assert with_attn["flops_per_token"] == pytest.approx(
        6 * (29_004_170_496 - 126464 * 5376) + 12 * 88 * 42 * 128 * 4096
    )
    assert with_attn["cost"] > 6.35e6


def test_compare_ranks_the_catalog_cheapest_first(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, ["cost", "model=ling_plus", "--compare", "tokens=1e12", "currency=RMB", "--json"])
    costs = [r["cost"] for r in out["ranking"]]
    assert costs == sorted(costs) and len(costs) >= 15
    assert {r["currency"] for r in out["ranking"]} == {"RMB"}
    names = [r["device"] for r in out["ranking"]]
    assert "cpu" not in names  # no catalog peak or price: not ranked


def test_compare_a_list_with_measured_throughput(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    measured = {
        "hardware": "a100",
        "tokens_per_s_per_device": 1000.0,
        "flops_per_token": 0.0,  # filled below from inspect, to be the same model
        "mfu": 0.0,
        "seq_len": 2048,
        "peak_tflops": 312.0,
    }
    info = _json(capsys, ["inspect", "model=ling_tiny", "--seq-len", "2048", "--json"])  # cost sizes for max_seq_len
    measured["flops_per_token"] = info["flops_per_token"]
    measured["mfu"] = 1000.0 * info["flops_per_token"] / 312e12
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps(measured))
    out = _json(capsys, ["cost", "model=ling_tiny", "--compare", "a100,h100", "--measured", str(path), "--json"])
    by = {r["device"]: r for r in out["ranking"]}
    assert by["a100"]["mode"] == "measured" and by["a100"]["tokens_per_s_per_device"] == 1000.0
    assert by["h100"]["mfu"] == pytest.approx(measured["mfu"])  # the measured MFU transferred


def test_list_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cost", "--list"]) == 0
    assert "device_d" in capsys.readouterr().out
    assert main(["cost", "model=ling_tiny", "hardware=h1000"]) == 2
    assert "hardware='h1000' is not in the catalog" in capsys.readouterr().err
    assert main(["cost", "model=ling_tiny", "hardware=h100", "mfu=30"]) == 2
    assert "mfu=30.0 must be a fraction" in capsys.readouterr().err
    assert main(["cost", "model=ling_tiny", "budget=3"]) == 2
    assert "unknown key 'budget'" in capsys.readouterr().err
