"""moe-plugin plan: the Ling-Plus verdicts through the command line, --json, and errors naming the key."""

from __future__ import annotations

import json

import pytest

from moe_plugin.cli.main import main

LING_PLUS = ["plan", "model=ling_plus", "hardware=device_d", "devices=1024"]


@pytest.fixture(scope="module")
def ling_plus_json() -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*LING_PLUS, "--json"]) == 0
    return json.loads(buf.getvalue())


def test_json_verdicts(ling_plus_json: dict) -> None:
    out = ling_plus_json
    assert out["model"] == "ling_plus" and out["hardware"] == "device_d" and out["devices"] == 1024
    assert out["usable_gb"] == pytest.approx(72.0)
    assert out["replicated_dense"]["fits"] is False
    rec = out["recommended"]
    assert (rec["ep"], rec["shard"], rec["replicate"], rec["checkpointing"], rec["micro_batch"]) == (
        8,
        1024,
        1,
        "full",
        2,
    )
    assert rec["peak_gb"] < 72.0 and rec["cost"]["currency"] == "RMB"
    assert out["fits"] and all(e["fits"] and e["shard"] > 1 for e in out["fits"])
    assert out["fastest"] == out["fits"][0]
    tps = [e["time"]["tokens_per_s_per_device"] for e in out["fits"]]
    assert tps == sorted(tps, reverse=True)
    assert all(e["reason"] for e in out["does_not_fit"])
    assert len(out["fits"]) + len(out["does_not_fit"]) == 7 * 11 * 3 * 4  # EP x shard x ckpt x micro-batch


def test_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*LING_PLUS, "micro_batch=1,2", "top=3"]) == 0
    out = capsys.readouterr().out
    assert "fits at NO expert-parallel size" in out
    assert "recommended (most headroom within 2% of the fastest): EP8 x shard1024 x rep1 ckpt=full mb=2" in out
    assert "does not fit" in out and "weights+gradients+optimizer alone" in out


def test_filters_and_another_device(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "model=ling_lite", "hardware=h800", "devices=16", "checkpointing=full", "ep=8", "shard=1,16"]
    assert main([*argv, "precision=bf16-true", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    entries = out["fits"] + out["does_not_fit"]
    assert {(e["ep"], e["checkpointing"]) for e in entries} == {(8, "full")}
    assert {e["shard"] for e in entries} == {1, 16} and out["precision"] == "bf16-true"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "model=ling_tiny", "hardware=device_d"], "devices="),
        (["plan", "model=ling_tiny", "devices=2"], "hardware="),
        (["plan", "model=ling_tiny", "hardware=nope", "devices=2"], "hardware='nope'"),
        (["plan", "model=ling_tiny", "hardware=device_d", "devices=two"], "devices='two' must be an integer"),
        (["plan", "model=ling_tiny", "hardware=device_d", "devices=2", "precision=fp8"], "precision='fp8'"),
        (["plan", "model=ling_tiny", "hardware=device_d", "devices=2", "checkpointing=most"], "checkpointing='most'"),
        (["plan", "model=ling_tiny", "hardware=device_d", "devices=2", "micro_batch=0"], "micro_batch='0'"),
        (["plan", "model=ling_tiny", "hardware=device_d", "devices=2", "mfu=2"], "mfu=2"),
        (["plan", "model=ling_tiny", "hardware=device_d", "devices=2", "speed=9"], "unknown key 'speed'"),
        (["plan", "model=ling_tiny", "hardware=cpu", "devices=2"], "hardware.memory_gb"),
    ],
)
def test_errors_name_the_key(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-plugin plan:") and message in err
