"""Optional fast paths, each with a reference fallback. The only place (with accelerators/) for vendor choices."""

from moe_plugin.kernels.grouped_mm import (
    GroupedMM,
    grouped_mm_backend_name,
    grouped_mm_loop,
    grouped_mm_mm,
    grouped_mm_torch,
    select_grouped_mm,
)
from moe_plugin.kernels.native import native_ops, native_status
from moe_plugin.kernels.swiglu_experts import swiglu_experts

__all__ = [
    "GroupedMM",
    "grouped_mm_backend_name",
    "grouped_mm_loop",
    "grouped_mm_mm",
    "grouped_mm_torch",
    "native_ops",
    "native_status",
    "select_grouped_mm",
    "swiglu_experts",
]
