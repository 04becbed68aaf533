"""moe-plugin doctor: truthful on this machine; a simulated vendor shows up with its backend."""

from __future__ import annotations

import json

import pytest
import torch

from moe_plugin.cli import doctor
from moe_plugin.cli.main import main
from tests.vendor_sim import detection


def test_doctor_json_reports_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [v["name"] for v in report["vendors"]]
    assert "cpu" in names
    cpu = next(v for v in report["vendors"] if v["name"] == "cpu")
    assert cpu["backend"] == "gloo" and cpu["bf16"] == "yes (bf16 matmul ran)"
    assert report["torch"]["version"] == torch.__version__
    assert report["distributed_backends"]["gloo"] is True
    if not torch.accelerator.is_available():
        assert report["selected"] == "cpu" and names == ["cpu"]
        missing = {m["name"]: m for m in report["not_detected"]}
        assert "CANN" in missing["npu"]["install"] and set(missing) == {
            "cuda",
            "rocm",
            "npu",
            "xpu",
            "mlu",
            "musa",
            "mps",
        }
    assert report["libraries"]["lightning"]
    if report["selected"] == "cpu":  # the compiled experts node is reported, not compiled, by doctor
        status = report["kernel_paths"]["compiled CPU experts"]
        assert status.startswith(("compiled (", "not built yet", "disabled", "unavailable")), status


def test_doctor_text_lists_install_hints(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "accelerator=auto selects:" in out and "collective backend: gloo" in out


def test_simulated_npu_is_reported_with_hccl_but_not_claimed_to_compute() -> None:
    det = detection(devices={"npu": 2}, extensions={"torch_npu": "2.6.0"}, names={"npu": "Ascend910B2"})
    report = doctor.collect(det)
    npu = report["vendors"][0]
    assert report["selected"] == "npu" and npu["backend"] == "hccl" and npu["device_count"] == 2
    assert npu["catalog_entry"] == "ascend_910b"
    assert npu["grouped_mm"].startswith("torch_npu.npu_grouped_matmul (module torch_npu missing")
    assert not npu["bf16"].startswith("yes")  # no bf16 matmul can run on a simulated device
