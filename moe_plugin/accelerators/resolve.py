"""Turn `accelerator=<name>` from our config into Lightning Trainer arguments.

    auto -> the first present vendor in AUTO_ORDER (torch.accelerator's choice first), else CPU
    gpu  -> the first present non-CPU vendor (error if none)
    cuda -> NVIDIA CUDA, or ROCm on a HIP build of torch (ROCm answers to "cuda")
    rocm, npu, xpu, mlu, musa, mps, cpu -> that vendor, or a clear error listing what was detected

For vendor device types Lightning does not know (npu, xpu, mlu, musa) the Trainer arguments are
rewritten so Lightning does not fall back to CUDA/CPU behind the user's back:
    strategy auto, one device -> SingleDeviceStrategy(<type>:<index>)
    strategy auto, several    -> VendorDDPStrategy (strategy "ddp_<type>"), vendor backend
    strategy ddp              -> the same VendorDDPStrategy
    precision 16/bf16-mixed   -> MixedPrecision(device=<type>) passed as a plugin
Other strategies (e.g. expert_parallel) pass through; they get the backend from `default_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moe_plugin.accelerators.detect import Detection, detected
from moe_plugin.accelerators.profiles import PROFILES, VendorProfile


class AcceleratorNotFoundError(RuntimeError):
    """The requested vendor is not usable here; the message lists what was detected."""


def select_vendor(accelerator: str, detection: Detection | None = None) -> VendorProfile:
    """The vendor profile for `accelerator=<name>`, checked against what is present."""
    det = detection or detected()
    name = str(accelerator).lower()
    if name == "auto":
        return det.primary.profile
    if name == "gpu":
        for vendor_name, pv in det.present.items():
            if vendor_name != "cpu":
                return pv.profile
        raise AcceleratorNotFoundError(_missing_message("gpu", det))
    if name not in PROFILES:
        raise ValueError(
            f"accelerator={accelerator!r} is not a known vendor. Choose one of: auto, gpu, {', '.join(PROFILES)}."
        )
    if name == "cuda" and "rocm" in det.present:
        return PROFILES["rocm"]  # a HIP build of torch: "cuda" devices are AMD GPUs
    if name not in det.present:
        raise AcceleratorNotFoundError(_missing_message(name, det))
    return PROFILES[name]


def _missing_message(name: str, det: Detection) -> str:
    inputs = det.inputs
    lines = [f"accelerator={name} was requested, but it is not usable on this machine."]
    if name in PROFILES:
        p = PROFILES[name]
        lines[0] = (
            f"accelerator={name} ({p.vendor}, torch device type {p.device_type!r}) was requested, but it is not usable on this machine."
        )
        if p.extension:
            status = inputs.extensions.get(p.extension, "missing")
            lines.append(f"  extension {p.extension}: {'not installed' if status == 'missing' else status}")
        if name == "rocm" and not inputs.hip_version:
            lines.append(f"  torch {inputs.torch_version} is not a HIP (ROCm) build (torch.version.hip is None)")
        if name == "cuda":
            if inputs.hip_version:
                lines.append(f"  torch is a HIP build (ROCm {inputs.hip_version}): use accelerator=rocm")
            elif not inputs.cuda_version:
                lines.append(f"  torch {inputs.torch_version} is a CPU-only build (torch.version.cuda is None)")
        if not inputs.devices.get(p.device_type):
            lines.append(f"  torch.{p.device_type}: no usable device")
        lines.append(f"  to install: {p.install_hint}")
    lines.append(f"Detected: {det.summary()}.")
    lines.append(
        "Fix: set accelerator=auto (picks the detected vendor) or one of: " + ", ".join(det.present) + "; "
        "`moe-plugin doctor` shows the full report."
    )
    return "\n".join(lines)


@dataclass
class ResolvedAccelerator:
    profile: VendorProfile
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # accelerator, devices, strategy, precision, plugins

    @property
    def backend(self) -> str:
        return self.profile.backend


def _device_indices(devices: Any, count: int) -> list[int]:
    from moe_plugin.accelerators.lightning_accelerators import parse_device_indices

    return parse_device_indices(devices, count)


def resolve_accelerator(
    accelerator: str = "auto",
    devices: Any = "auto",
    strategy: Any = "auto",
    precision: Any = None,
    num_nodes: int = 1,
    detection: Detection | None = None,
) -> ResolvedAccelerator:
    """Vendor profile plus the Trainer arguments that make Lightning use it correctly.

    Strategy objects and non-default strategy names pass through untouched. Raises
    AcceleratorNotFoundError (message lists what was detected) when the vendor is absent.
    """
    from moe_plugin.accelerators.lightning_accelerators import ddp_strategy_name, vendor_precision_plugin

    det = detection or detected()
    profile = select_vendor(accelerator, det)
    kwargs: dict[str, Any] = {"accelerator": profile.lightning_name, "devices": devices, "strategy": strategy}
    precision_str = None if precision is None else str(precision)
    if precision_str is not None:
        kwargs["precision"] = precision_str
    if profile.native_in_lightning:
        return ResolvedAccelerator(profile, kwargs)

    count = det.present[profile.name].count
    indices = _device_indices(devices, count)
    kwargs["devices"] = indices
    if isinstance(strategy, str) and strategy in ("auto", "ddp"):
        if strategy == "auto" and len(indices) == 1 and num_nodes == 1:
            from lightning.pytorch.strategies import SingleDeviceStrategy

            kwargs["strategy"] = SingleDeviceStrategy(device=torch.device(profile.device_type, indices[0]))
        else:
            kwargs["strategy"] = ddp_strategy_name(profile)
    plugin = vendor_precision_plugin(precision_str, profile) if precision_str else None
    if plugin is not None:
        kwargs["precision"] = None  # Lightning refuses both precision= and a precision plugin
        kwargs["plugins"] = [plugin]
    return ResolvedAccelerator(profile, kwargs)
