"""Host memory allocator tuning for CPU training: keep freed memory in the process instead of returning it.

Why (measured on the default `python train.py` model, 2-core CPU, torch 2.13, docs/performance.md): torch's
CPU tensors come from glibc malloc, which serves every block above its mmap threshold (128 KiB, raised
dynamically up to 32 MiB) with a fresh mmap and trims freed heap memory back to the system. A training
step allocates and frees the same activation-sized blocks every step, so each step pays ~7,000-8,000
page faults (the kernel zero-fills every new page): ~3% of the step at 1-2 threads. Raising the mmap
threshold to glibc's maximum and disabling the trim keeps those pages mapped and reused:

    mallopt(M_MMAP_THRESHOLD, 32 MiB)      blocks up to 32 MiB come from the heap (reused, no fault)
    mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)   freed heap memory stays mapped for the next step

This is what PyTorch's CPU performance guide gets from jemalloc/tcmalloc, with no extra dependency. The
cost: resident memory does not shrink after a peak (the peak itself is unchanged). Skipped when the user
set any MALLOC_*_ environment tunable (their choice wins; bench/memory_plan.py sets one to measure
tensor memory), when MOE_PLUGIN_HOST_ALLOCATOR=default, and on a libc without mallopt (musl, macOS,
Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_BYTES = 2**31 - 1

ENV_SWITCH = "MOE_PLUGIN_HOST_ALLOCATOR"


def keep_freed_host_memory() -> bool:
    """Apply the two mallopt settings above; True when applied, False when skipped (see module docstring)."""
    if os.environ.get(ENV_SWITCH, "").lower() == "default":
        return False
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: other libcs' mallopt take other parameters
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
