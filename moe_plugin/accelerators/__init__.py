"""Vendor awareness: profiles, detection, Lightning accelerators, device catalog.

Nothing outside this package (and kernels/) knows vendor names. See docs/accelerators.md.
"""

from moe_plugin.accelerators.detect import Detection, detect, detected, gather_inputs, reset_detection
from moe_plugin.accelerators.profiles import PROFILES, VendorProfile, default_backend, get_profile
from moe_plugin.accelerators.resolve import (
    AcceleratorNotFoundError,
    ResolvedAccelerator,
    resolve_accelerator,
    select_vendor,
)

__all__ = [
    "PROFILES",
    "AcceleratorNotFoundError",
    "Detection",
    "ResolvedAccelerator",
    "VendorProfile",
    "default_backend",
    "detect",
    "detected",
    "gather_inputs",
    "get_profile",
    "reset_detection",
    "resolve_accelerator",
    "select_vendor",
]
