"""accelerator=<name> -> Trainer arguments. CPU for real; other vendors with simulated presence."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy

from moe_plugin.accelerators import AcceleratorNotFoundError, resolve_accelerator, select_vendor
from tests.vendor_sim import detection

NPU = {"devices": {"npu": 8}, "extensions": {"torch_npu": "2.6.0"}, "names": {"npu": "Ascend910B2"}}


def test_auto_on_this_machine_is_native_and_untouched() -> None:
    r = resolve_accelerator("auto", devices=1, strategy="auto", precision="bf16-mixed")
    if not torch.accelerator.is_available():
        assert r.profile.name == "cpu"
        assert r.trainer_kwargs == {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "bf16-mixed"}


def test_missing_vendor_fails_listing_what_was_detected() -> None:
    det = detection()
    with pytest.raises(AcceleratorNotFoundError) as err:
        select_vendor("npu", det)
    msg = str(err.value)
    assert "accelerator=npu (Huawei Ascend" in msg
    assert "torch_npu: not installed" in msg
    assert "CANN" in msg
    assert "Detected: cpu (simulated cpu, 2 threads)" in msg
    assert "accelerator=auto" in msg


def test_rocm_requested_on_a_cuda_build_explains_why() -> None:
    with pytest.raises(AcceleratorNotFoundError, match="not a HIP \\(ROCm\\) build"):
        select_vendor("rocm", detection(devices={"cuda": 1}, cuda="12.8"))


def test_gpu_means_any_non_cpu_vendor() -> None:
    assert select_vendor("gpu", detection(**NPU)).name == "npu"
    with pytest.raises(AcceleratorNotFoundError, match="accelerator=gpu"):
        select_vendor("gpu", detection())


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="not a known vendor.*npu"):
        select_vendor("ascend", detection())


def test_cuda_on_a_hip_build_is_rocm_behind_lightnings_cuda() -> None:
    r = resolve_accelerator("cuda", devices=2, detection=detection(devices={"cuda": 8}, hip="6.4"))
    assert r.profile.name == "rocm" and r.backend == "nccl"
    assert r.trainer_kwargs["accelerator"] == "cuda"  # Lightning's CUDA classes run HIP builds unchanged
    assert r.trainer_kwargs["strategy"] == "auto"


XPU = {"devices": {"xpu": 4}}  # xpu is a device type torch knows without any extension


def test_vendor_single_device_gets_a_vendor_device_strategy_and_amp_plugin() -> None:
    r = resolve_accelerator("xpu", devices=[3], precision="bf16-mixed", detection=detection(**XPU))
    kw = r.trainer_kwargs
    assert kw["accelerator"] == "xpu" and kw["devices"] == [3]
    assert isinstance(kw["strategy"], SingleDeviceStrategy)
    assert kw["strategy"].root_device == torch.device("xpu", 3)
    (plugin,) = kw["plugins"]
    assert isinstance(plugin, MixedPrecision) and plugin.device == "xpu"
    assert kw["precision"] is None  # Lightning refuses precision= together with a precision plugin


NPU_SCRIPT = """
import torch
# What torch_npu does on import: name the privateuse1 device type "npu". Nothing else of Ascend's
# stack is present, so this checks only our resolution logic with a real "npu" device type.
torch.utils.rename_privateuse1_backend("npu")
from lightning.pytorch.strategies import SingleDeviceStrategy
from moe_plugin.accelerators import resolve_accelerator
from tests.vendor_sim import detection
det = detection(devices={"npu": 8}, extensions={"torch_npu": "2.6.0"})
kw = resolve_accelerator("npu", devices=[3], precision="16-mixed", detection=det).trainer_kwargs
assert isinstance(kw["strategy"], SingleDeviceStrategy), kw
assert kw["strategy"].root_device == torch.device("npu", 3), kw["strategy"].root_device
assert kw["plugins"][0].device == "npu" and kw["precision"] is None
print("OK")
"""


@pytest.mark.slow
def test_npu_resolution_with_the_npu_device_type_registered(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    out = subprocess.run(
        [sys.executable, "-c", NPU_SCRIPT],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize(
    "vendor,ext", [("npu", "torch_npu"), ("xpu", None), ("mlu", "torch_mlu"), ("musa", "torch_musa")]
)
def test_several_vendor_devices_use_vendor_ddp(vendor: str, ext: str | None) -> None:
    det = detection(devices={vendor: 4}, extensions={ext: "1.0"} if ext else None)
    for strategy in ("auto", "ddp"):
        r = resolve_accelerator(vendor, devices=4, strategy=strategy, detection=det)
        assert r.trainer_kwargs["strategy"] == f"ddp_{vendor}"
        assert r.trainer_kwargs["devices"] == [0, 1, 2, 3]
    # strategies the plugin does not rewrite pass through (e.g. expert_parallel)
    r = resolve_accelerator(vendor, devices=4, strategy="expert_parallel", detection=det)
    assert r.trainer_kwargs["strategy"] == "expert_parallel"


def test_fp32_on_a_vendor_needs_no_plugin() -> None:
    r = resolve_accelerator("xpu", devices=1, precision="32-true", detection=detection(**XPU))
    assert "plugins" not in r.trainer_kwargs and r.trainer_kwargs["precision"] == "32-true"


def test_too_many_devices_names_the_key() -> None:
    with pytest.raises(ValueError, match="trainer.devices=16 but only 8"):
        resolve_accelerator("npu", devices=16, detection=detection(**NPU))
    with pytest.raises(ValueError, match="indices \\[9\\]"):
        resolve_accelerator("npu", devices="0,9", detection=detection(**NPU))
