"""Vendor profiles: what the plugin needs to know about each accelerator family.

A profile is static knowledge (torch device type, extension module, collective backend, precision
support of the software stack, grouped-matmul path). Whether a vendor is *present* is decided by
`detect.py`; which one a run uses is decided by `resolve.py`.

Collective backends (torch.distributed names):
    CUDA nccl | ROCm nccl (RCCL answers to the same name) | Ascend hccl | Intel xccl |
    Cambricon cncl | Moore Threads mccl | MPS and CPU gloo.

fp8 here means "the vendor's stack exposes fp8 matmuls on some of its devices"; whether a given
device has them is in the hardware catalog (conf/hardware/) and, for CUDA, in the device capability.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VendorProfile:
    name: str  # our accelerator name: accelerator=<name>
    vendor: str
    device_type: str  # torch.device type; ROCm builds of torch answer to "cuda"
    extension: str | None  # module to import to register the device with torch; None when built in
    backend: str  # torch.distributed backend name for this device type
    bf16: bool
    fp8: bool
    grouped_mm: str  # grouped-matmul op the kernels/ fast path uses here ("loop": reference fallback only)
    lightning_name: str  # name in Lightning's AcceleratorRegistry (ours for npu/xpu/mlu/musa)
    install_hint: str

    @property
    def native_in_lightning(self) -> bool:
        """Lightning 2.6 itself builds strategies and AMP correctly only for these device types."""
        return self.device_type in ("cuda", "mps", "cpu")


PROFILES: dict[str, VendorProfile] = {
    p.name: p
    for p in (
        VendorProfile(
            name="cuda",
            vendor="NVIDIA",
            device_type="cuda",
            extension=None,
            backend="nccl",
            bf16=True,
            fp8=True,
            grouped_mm="torch._grouped_mm",
            lightning_name="cuda",
            install_hint="pip install torch --index-url https://download.pytorch.org/whl/cu128 (a CUDA build of torch)",
        ),
        VendorProfile(
            name="rocm",
            vendor="AMD",
            device_type="cuda",
            extension=None,
            backend="nccl",
            bf16=True,
            fp8=True,
            grouped_mm="torch._grouped_mm",
            lightning_name="cuda",
            install_hint="pip install torch --index-url https://download.pytorch.org/whl/rocm6.4 (a HIP build of torch)",
        ),
        VendorProfile(
            name="npu",
            vendor="Huawei Ascend",
            device_type="npu",
            extension="torch_npu",
            backend="hccl",
            bf16=True,
            fp8=False,
            grouped_mm="torch_npu.npu_grouped_matmul",
            lightning_name="npu",
            install_hint="install the CANN toolkit, then pip install torch-npu==<your torch version> (Ascend's torch_npu)",
        ),
        VendorProfile(
            name="xpu",
            vendor="Intel",
            device_type="xpu",
            extension=None,  # built into torch >= 2.4 (XPU wheels); older stacks used intel_extension_for_pytorch
            backend="xccl",
            bf16=True,
            fp8=False,
            grouped_mm="loop",
            lightning_name="xpu",
            install_hint="pip install torch --index-url https://download.pytorch.org/whl/xpu (an XPU build of torch)",
        ),
        VendorProfile(
            name="mlu",
            vendor="Cambricon",
            device_type="mlu",
            extension="torch_mlu",
            backend="cncl",
            bf16=True,
            fp8=False,
            grouped_mm="loop",
            lightning_name="mlu",
            install_hint="install Cambricon's CNToolkit and the torch_mlu wheel matching your torch version",
        ),
        VendorProfile(
            name="musa",
            vendor="Moore Threads",
            device_type="musa",
            extension="torch_musa",
            backend="mccl",
            bf16=True,
            fp8=False,
            grouped_mm="loop",
            lightning_name="musa",
            install_hint="install the MUSA toolkit and the torch_musa wheel matching your torch version",
        ),
        VendorProfile(
            name="mps",
            vendor="Apple",
            device_type="mps",
            extension=None,
            backend="gloo",
            bf16=True,
            fp8=False,
            grouped_mm="loop",
            lightning_name="mps",
            install_hint="use a macOS arm64 build of torch on Apple silicon",
        ),
        VendorProfile(
            name="cpu",
            vendor="CPU",
            device_type="cpu",
            extension=None,
            backend="gloo",
            bf16=True,
            fp8=False,
            grouped_mm="torch._grouped_mm",
            lightning_name="cpu",
            install_hint="always available",
        ),
    )
}

# Order in which `accelerator=auto` prefers vendors when several are present (CPU last).
AUTO_ORDER: tuple[str, ...] = ("cuda", "rocm", "npu", "xpu", "mlu", "musa", "mps", "cpu")

# Vendor device types whose Lightning accelerator is ours (registered on import of moe_plugin).
PLUGIN_DEVICE_TYPES: tuple[str, ...] = ("npu", "xpu", "mlu", "musa")


def get_profile(name: str) -> VendorProfile:
    """Profile by accelerator name; `gpu` is not a vendor (use `auto`)."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"accelerator={name!r} is not a known vendor. Choose one of: auto, {', '.join(PROFILES)}."
        ) from None


def profile_for_device_type(device_type: str, hip: bool = False) -> VendorProfile:
    """The profile behind a torch device type (`cuda` is ROCm on a HIP build of torch)."""
    if device_type == "cuda":
        return PROFILES["rocm" if hip else "cuda"]
    for p in PROFILES.values():
        if p.device_type == device_type:
            return p
    raise ValueError(f"no vendor profile for torch device type {device_type!r}; known: {sorted(PROFILES)}.")


def default_backend(device_type: str) -> str:
    """torch.distributed backend for process groups on `device_type` (the expert-parallel helper uses this).

    Prefers torch's own answer once the vendor extension has registered the device
    (`torch.distributed.Backend.default_device_backend_map`), and falls back to the profile.
    Unknown device types get gloo, like Lightning does.
    """
    import torch.distributed as dist

    backend_map = getattr(getattr(dist, "Backend", None), "default_device_backend_map", {}) or {}
    if device_type in backend_map and backend_map[device_type] not in ("fake", "undefined"):
        return str(backend_map[device_type])
    for p in PROFILES.values():
        if p.device_type == device_type:
            return p.backend
    return "gloo"
