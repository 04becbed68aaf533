"""Which vendors are present on this machine, detected once per process.

Detection reads three things and nothing else:
    1. the installed vendor extensions (torch_npu, torch_mlu, torch_musa): importable? imported OK?
       Importing them is what registers their device type with torch;
    2. torch itself: `torch.version.hip` (a HIP build answers to device type "cuda" but is AMD ROCm),
       `torch.version.cuda`, `torch.accelerator.current_accelerator()`;
    3. per device type, the `torch.<type>` module: is_available(), device_count(), device names, memory.

`gather_inputs()` reads them into a plain `DetectionInputs`; `detect(inputs)` is a pure function of
it. Tests simulate a vendor by building `DetectionInputs` by hand (or monkeypatching
`gather_inputs`): that exercises the selection logic, never the vendor's hardware.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field

import torch

from moe_plugin.accelerators.profiles import AUTO_ORDER, PROFILES, VendorProfile

# Device types probed through torch.<type> (CPU is always present and described separately).
PROBED_DEVICE_TYPES: tuple[str, ...] = ("cuda", "npu", "xpu", "mlu", "musa", "mps")


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    memory_bytes: int | None = None
    capability: tuple[int, int] | None = None


@dataclass(frozen=True)
class DetectionInputs:
    """Everything detection looks at, as plain data."""

    torch_version: str
    hip_version: str | None
    cuda_version: str | None
    current_accelerator: str | None  # torch.accelerator.current_accelerator().type, or None
    extensions: dict[str, str] = field(default_factory=dict)  # module -> version | "missing" | "error: ..."
    devices: dict[str, tuple[DeviceInfo, ...]] = field(default_factory=dict)  # device type -> usable devices
    cpu_name: str = "cpu"
    cpu_threads: int = 1
    cpu_memory_bytes: int | None = None


@dataclass(frozen=True)
class PresentVendor:
    profile: VendorProfile
    devices: tuple[DeviceInfo, ...]

    @property
    def count(self) -> int:
        return len(self.devices)


@dataclass(frozen=True)
class Detection:
    inputs: DetectionInputs
    present: dict[str, PresentVendor]  # profile name -> devices, in AUTO_ORDER; always has "cpu"

    @property
    def primary(self) -> PresentVendor:
        """What `accelerator=auto` picks: the first present vendor in AUTO_ORDER (CPU last)."""
        return next(iter(self.present.values()))

    def summary(self) -> str:
        """One line per present vendor, e.g. `cpu (1 device: AMD EPYC, 2 threads)`."""
        parts = []
        for name, pv in self.present.items():
            if name == "cpu":
                parts.append(f"cpu ({self.inputs.cpu_name}, {self.inputs.cpu_threads} threads)")
            else:
                names = ", ".join(sorted({d.name for d in pv.devices}))
                parts.append(f"{name} ({pv.count} device{'s' if pv.count != 1 else ''}: {names})")
        return "; ".join(parts)


def _extension_status(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "missing"
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # a broken vendor install must not break detection of the others
        return f"error: {type(err).__name__}: {err}"
    return str(getattr(mod, "__version__", "installed"))


def _probe(device_type: str) -> tuple[DeviceInfo, ...]:
    mod = getattr(torch, device_type, None) if device_type != "mps" else getattr(torch.backends, "mps", None)
    try:
        if mod is None or not mod.is_available():
            return ()
        if device_type == "mps":
            return (DeviceInfo(0, "Apple MPS"),)
        infos = []
        for i in range(int(mod.device_count())):
            name = mod.get_device_name(i) if hasattr(mod, "get_device_name") else f"{device_type}:{i}"
            props = mod.get_device_properties(i) if hasattr(mod, "get_device_properties") else None
            memory = getattr(props, "total_memory", None)
            cap = (props.major, props.minor) if hasattr(props, "major") and hasattr(props, "minor") else None
            infos.append(DeviceInfo(i, str(name), memory, cap))
        return tuple(infos)
    except Exception:  # a driver error means "not usable", which is what detection reports
        return ()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def gather_inputs() -> DetectionInputs:
    """Read the real environment (imports the vendor extensions that are installed)."""
    extensions = {p.extension: _extension_status(p.extension) for p in PROFILES.values() if p.extension}
    current = None
    accel = getattr(torch, "accelerator", None)
    if accel is not None:
        try:
            dev = accel.current_accelerator()
            current = dev.type if dev is not None else None
        except Exception:
            current = None
    return DetectionInputs(
        torch_version=torch.__version__,
        hip_version=getattr(torch.version, "hip", None),
        cuda_version=getattr(torch.version, "cuda", None),
        current_accelerator=current,
        extensions=extensions,
        devices={t: _probe(t) for t in PROBED_DEVICE_TYPES},
        cpu_name=_cpu_name(),
        cpu_threads=torch.get_num_threads() or os.cpu_count() or 1,
        cpu_memory_bytes=_host_memory(),
    )


def _host_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def detect(inputs: DetectionInputs) -> Detection:
    """Pure: which vendors are usable given what was read."""
    present: dict[str, PresentVendor] = {}
    for name in AUTO_ORDER:
        profile = PROFILES[name]
        if name == "cpu":
            present[name] = PresentVendor(profile, (DeviceInfo(0, inputs.cpu_name, inputs.cpu_memory_bytes),))
            continue
        if name == "cuda" and inputs.hip_version:
            continue  # a HIP build: its "cuda" devices are AMD
        if name == "rocm" and not inputs.hip_version:
            continue
        if profile.extension and not _extension_ok(inputs.extensions.get(profile.extension, "missing")):
            continue
        devices = inputs.devices.get(profile.device_type, ())
        if devices:
            present[name] = PresentVendor(profile, devices)
    # torch.accelerator names the device type torch itself will use: put it first.
    if inputs.current_accelerator:
        for name, pv in list(present.items()):
            if pv.profile.device_type == inputs.current_accelerator:
                present = {name: pv, **{k: v for k, v in present.items() if k != name}}
                break
    return Detection(inputs, present)


def _extension_ok(status: str) -> bool:
    return status not in ("missing",) and not status.startswith("error")


@functools.lru_cache(maxsize=1)
def detected() -> Detection:
    """The detection of this process, computed once."""
    return detect(gather_inputs())


def reset_detection() -> None:
    """Forget the cached detection (tests; after installing an extension in a live process)."""
    detected.cache_clear()
