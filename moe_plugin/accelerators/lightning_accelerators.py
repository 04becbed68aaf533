"""Lightning accelerators, strategies and the precision plugin for vendor devices.

Lightning 2.6 knows CUDA, MPS, XLA and CPU. For every other device type it silently falls back to CPU
(`devices=1` -> SingleDeviceStrategy("cpu")), builds AMP with `device="cuda"`, and wraps DDP in a
`torch.cuda.stream` (docs: ../shared/LIGHTNING-NOTES.md). This module supplies, per vendor device
type (npu, xpu, mlu, musa):
    - `VendorAccelerator` subclasses, registered by name (`accelerator="npu"`);
    - a single-device strategy per device type (`strategy="single_npu"`), device 0 by default;
    - `VendorDDPStrategy` (`strategy="ddp_npu"`): DDP without CUDA-only streams, vendor backend;
    - `vendor_precision_plugin`: MixedPrecision whose autocast runs on the vendor device type.
ROCm needs none of this: a HIP build of torch answers to "cuda", and Lightning's CUDA classes work.

`register_all()` runs when `moe_plugin` is imported; it only touches the registries (no detection,
no vendor import), so it is cheap. Everything is device-agnostic through `torch.accelerator` and
`getattr(torch, device_type)`, so the same code serves every vendor.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ClassVar

import torch
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.accelerators import Accelerator, AcceleratorRegistry
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from torch.nn.parallel import DistributedDataParallel

from moe_plugin.accelerators.detect import detected
from moe_plugin.accelerators.profiles import PLUGIN_DEVICE_TYPES, PROFILES, VendorProfile, default_backend


def parse_device_indices(devices: Any, available: int, key: str = "trainer.devices") -> list[int]:
    """`devices` as Lightning accepts it (int, -1, "auto", "0,2", [0, 2]) -> device indices."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return list(range(available))
        if "," in text:
            return _check([int(x) for x in text.split(",") if x.strip()], available, key, devices)
        devices = int(text)
    if isinstance(devices, int):
        if devices == -1:
            return list(range(available))
        if devices < 1:
            raise ValueError(f"{key}={devices!r}: ask for at least one device (or -1 / 'auto' for all).")
        if devices > available:
            raise ValueError(f"{key}={devices} but only {available} device(s) are visible. Lower {key}.")
        return list(range(devices))
    return _check([int(i) for i in devices], available, key, devices)


def _check(indices: list[int], available: int, key: str, raw: Any) -> list[int]:
    bad = [i for i in indices if not 0 <= i < available]
    if bad or not indices:
        raise ValueError(f"{key}={raw!r}: indices {bad or indices} are not in 0..{available - 1}.")
    return indices


class VendorAccelerator(Accelerator):
    """A Lightning accelerator for one vendor device type, device-agnostic inside."""

    profile_name: ClassVar[str]

    @classmethod
    def profile(cls) -> VendorProfile:
        return PROFILES[cls.profile_name]

    def setup_device(self, device: torch.device) -> None:
        expected = self.profile().device_type
        if device.type != expected:
            raise ValueError(f"{type(self).__name__} drives {expected!r} devices, got {device}.")
        torch.accelerator.set_device_index(device.index or 0)

    def get_device_stats(self, device: _DEVICE) -> dict[str, Any]:
        """Allocator statistics through torch.accelerator (same keys on every vendor)."""
        index = torch.device(device).index or 0
        stats: dict[str, Any] = {
            "memory_allocated_bytes": torch.accelerator.memory_allocated(index),
            "memory_reserved_bytes": torch.accelerator.memory_reserved(index),
            "max_memory_allocated_bytes": torch.accelerator.max_memory_allocated(index),
        }
        try:
            free, total = torch.accelerator.get_memory_info(index)
            stats.update(memory_free_bytes=free, memory_total_bytes=total)
        except (RuntimeError, AttributeError):
            pass  # not every backend reports device-wide memory
        return stats

    def teardown(self) -> None:
        if torch.accelerator.is_available():
            torch.accelerator.empty_cache()

    @classmethod
    def parse_devices(cls, devices: Any) -> list[int]:  # type: ignore[override]
        return parse_device_indices(devices, cls.auto_device_count())

    @classmethod
    def get_parallel_devices(cls, devices: Any) -> list[torch.device]:  # type: ignore[override]
        indices = devices if isinstance(devices, list) else cls.parse_devices(devices)
        return [torch.device(cls.profile().device_type, i) for i in indices]

    @classmethod
    def auto_device_count(cls) -> int:  # type: ignore[override]
        pv = detected().present.get(cls.profile_name)
        return pv.count if pv else 0

    @classmethod
    def is_available(cls) -> bool:  # type: ignore[override]
        return cls.profile_name in detected().present

    @classmethod
    def name(cls) -> str:  # type: ignore[override]
        return cls.profile().lightning_name


class NPUAccelerator(VendorAccelerator):
    """Huawei Ascend through torch_npu (device type "npu", backend hccl)."""

    profile_name = "npu"


class XPUAccelerator(VendorAccelerator):
    """Intel GPUs through torch's built-in XPU support (device type "xpu", backend xccl)."""

    profile_name = "xpu"


class MLUAccelerator(VendorAccelerator):
    """Cambricon through torch_mlu (device type "mlu", backend cncl)."""

    profile_name = "mlu"


class MUSAAccelerator(VendorAccelerator):
    """Moore Threads through torch_musa (device type "musa", backend mccl)."""

    profile_name = "musa"


ACCELERATORS: dict[str, type[VendorAccelerator]] = {
    c.profile_name: c for c in (NPUAccelerator, XPUAccelerator, MLUAccelerator, MUSAAccelerator)
}


class VendorDDPStrategy(DDPStrategy):
    """DDP for any device type: the vendor's collective backend, and no CUDA-only stream.

    Lightning's DDPStrategy wraps `DistributedDataParallel(...)` in `torch.cuda.stream(...)` whenever
    device ids are set, which fails on NPU/XPU (Lightning issue #19766). Here the stream is used only
    on CUDA (and ROCm, which answers to "cuda"); other devices construct DDP directly.
    """

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or default_backend(self.root_device.type)

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        device_ids = self.determine_ddp_device_ids()
        cuda = device_ids is not None and self.root_device.type == "cuda"
        ctx = torch.cuda.stream(torch.cuda.Stream()) if cuda else nullcontext()
        with ctx:
            return DistributedDataParallel(module=model, device_ids=device_ids, **self._ddp_kwargs)


def vendor_precision_plugin(precision: str, profile: VendorProfile) -> MixedPrecision | None:
    """AMP on the vendor's device type, or None when Lightning builds the right plugin itself.

    Lightning builds MixedPrecision(device="cuda") for any accelerator other than CPU/MPS; vendor
    devices need autocast(device_type="npu") and a GradScaler on that device for fp16.
    """
    if precision not in ("16-mixed", "bf16-mixed"):
        return None
    if precision == "bf16-mixed" and not profile.bf16:
        raise ValueError(
            f"trainer.precision={precision!r} but {profile.vendor} ({profile.name}) has no bf16 support. "
            "Use trainer.precision=16-mixed or 32-true."
        )
    if profile.native_in_lightning:
        return None
    return MixedPrecision(precision, device=profile.device_type)  # type: ignore[arg-type]


def single_device_strategy_name(profile: VendorProfile) -> str:
    return f"single_{profile.device_type}"


def ddp_strategy_name(profile: VendorProfile) -> str:
    return f"ddp_{profile.device_type}"


def register_all() -> None:
    """Register our accelerators and strategies by name with Lightning (idempotent, cheap)."""
    for device_type in PLUGIN_DEVICE_TYPES:
        cls = ACCELERATORS[device_type]
        profile = cls.profile()
        if device_type not in AcceleratorRegistry:
            AcceleratorRegistry.register(device_type, cls, description=f"{profile.vendor} ({device_type}), moe_plugin")
        single = single_device_strategy_name(profile)
        if single not in StrategyRegistry:
            StrategyRegistry.register(
                single,
                SingleDeviceStrategy,
                description=f"One {profile.vendor} device ({device_type}:0), moe_plugin",
                device=f"{device_type}:0",
            )
        ddp = ddp_strategy_name(profile)
        if ddp not in StrategyRegistry:
            StrategyRegistry.register(
                ddp,
                VendorDDPStrategy,
                description=f"DDP on {profile.vendor} ({profile.backend}, no CUDA streams), moe_plugin",
                process_group_backend=profile.backend,
            )
