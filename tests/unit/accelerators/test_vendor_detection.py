"""Detection: the real CPU path on this machine, and every other vendor's selection logic with its
presence simulated (tests/vendor_sim.py). Simulated tests never exercise a vendor's stack."""

from __future__ import annotations

import importlib

import pytest
import torch

from moe_plugin.accelerators.detect import detect, detected, gather_inputs, reset_detection
from moe_plugin.accelerators.profiles import AUTO_ORDER, PROFILES, default_backend, get_profile, profile_for_device_type
from tests.vendor_sim import detection, inputs

detect_mod = importlib.import_module("moe_plugin.accelerators.detect")

# Collective backends per vendor (LIGHTNING-NOTES.md, torch.distributed names).
EXPECTED_BACKENDS = {
    "cuda": "nccl",
    "rocm": "nccl",
    "npu": "hccl",
    "xpu": "xccl",
    "mlu": "cncl",
    "musa": "mccl",
    "mps": "gloo",
    "cpu": "gloo",
}


def test_profiles_cover_every_vendor_with_its_backend() -> None:
    assert set(PROFILES) == set(EXPECTED_BACKENDS) == set(AUTO_ORDER)
    for name, backend in EXPECTED_BACKENDS.items():
        assert PROFILES[name].backend == backend, name
    assert PROFILES["rocm"].device_type == "cuda"  # a HIP build answers to "cuda"
    assert PROFILES["npu"].extension == "torch_npu"
    assert PROFILES["npu"].grouped_mm == "torch_npu.npu_grouped_matmul"


def test_default_backend_real_for_cpu_and_profile_fallback_for_unregistered_devices() -> None:
    assert default_backend("cpu") == "gloo"  # torch's own answer on this machine
    # npu/mlu/musa are not registered with torch here (no extension): the profile answers.
    assert default_backend("npu") == "hccl"
    assert default_backend("mlu") == "cncl"
    assert default_backend("musa") == "mccl"
    assert default_backend("no_such_device") == "gloo"


def test_get_profile_names_the_choices() -> None:
    with pytest.raises(ValueError, match="accelerator='tpu9'.*auto, cuda, rocm, npu"):
        get_profile("tpu9")
    assert profile_for_device_type("cuda", hip=True).name == "rocm"
    assert profile_for_device_type("cuda").name == "cuda"


def test_real_detection_on_this_machine_reports_what_torch_reports() -> None:
    real = detect(gather_inputs())
    assert "cpu" in real.present
    for name, pv in real.present.items():
        if name != "cpu":  # whatever else is claimed must be what torch itself says
            mod = getattr(torch, pv.profile.device_type)
            assert mod.is_available() and mod.device_count() == pv.count
    if not torch.accelerator.is_available():
        assert list(real.present) == ["cpu"] and real.primary.profile.name == "cpu"
    assert real.inputs.hip_version == torch.version.hip
    for ext, status in real.inputs.extensions.items():
        assert status != "missing" or __import__("importlib.util").util.find_spec(ext) is None


def test_detection_runs_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = detect_mod.gather_inputs

    def counting():  # type: ignore[no-untyped-def]
        calls.append(1)
        return real()

    monkeypatch.setattr(detect_mod, "gather_inputs", counting)
    reset_detection()
    try:
        assert detected() is detected()
        assert len(calls) == 1
    finally:
        reset_detection()


@pytest.mark.parametrize(
    "vendor,kwargs",
    [
        ("cuda", {"devices": {"cuda": 8}, "cuda": "12.8"}),
        ("rocm", {"devices": {"cuda": 8}, "hip": "6.4"}),
        ("npu", {"devices": {"npu": 8}, "extensions": {"torch_npu": "2.6.0"}}),
        ("xpu", {"devices": {"xpu": 4}}),
        ("mlu", {"devices": {"mlu": 8}, "extensions": {"torch_mlu": "1.24"}}),
        ("musa", {"devices": {"musa": 8}, "extensions": {"torch_musa": "1.3"}}),
        ("mps", {"devices": {"mps": 1}}),
    ],
)
def test_simulated_vendor_is_detected_and_picked_by_auto(vendor: str, kwargs: dict) -> None:
    det = detection(**kwargs)
    assert det.primary.profile.name == vendor
    assert list(det.present) == [vendor, "cpu"]
    assert det.present[vendor].count == next(iter(kwargs["devices"].values()))


def test_hip_build_is_rocm_not_cuda() -> None:
    det = detection(devices={"cuda": 2}, hip="6.4")
    assert "cuda" not in det.present and "rocm" in det.present


def test_vendor_without_its_extension_is_absent_even_with_devices() -> None:
    assert "npu" not in detection(devices={"npu": 8}).present
    broken = detection(devices={"npu": 8}, extensions={"torch_npu": "error: ImportError: libhccl.so"})
    assert "npu" not in broken.present


def test_torch_accelerator_choice_goes_first() -> None:
    det = detection(devices={"cuda": 1, "xpu": 2}, cuda="12.8", current="xpu")
    assert list(det.present)[:2] == ["xpu", "cuda"]
    assert detection(devices={"cuda": 1, "xpu": 2}, cuda="12.8").primary.profile.name == "cuda"


def test_summary_lists_devices() -> None:
    det = detection(devices={"npu": 2}, extensions={"torch_npu": "2.6.0"}, names={"npu": "Ascend910B2"})
    assert det.summary() == "npu (2 devices: Ascend910B2); cpu (simulated cpu, 2 threads)"
    assert inputs().devices == {}
