"""Simulated vendor presence for selection-logic tests.

These build `DetectionInputs` by hand: they exercise our detection/selection code paths, never a
vendor's hardware or software stack (none is installed on the CI machine).
"""

from __future__ import annotations

from moe_plugin.accelerators.detect import DetectionInputs, DeviceInfo, detect


def inputs(
    devices: dict[str, int] | None = None,
    hip: str | None = None,
    cuda: str | None = None,
    extensions: dict[str, str] | None = None,
    current: str | None = None,
    names: dict[str, str] | None = None,
) -> DetectionInputs:
    names = names or {}
    exts = {"torch_npu": "missing", "torch_mlu": "missing", "torch_musa": "missing"}
    exts.update(extensions or {})
    return DetectionInputs(
        torch_version="2.13.0+simulated",
        hip_version=hip,
        cuda_version=cuda,
        current_accelerator=current,
        extensions=exts,
        devices={
            t: tuple(DeviceInfo(i, names.get(t, f"simulated {t}"), 64 * 2**30) for i in range(n))
            for t, n in (devices or {}).items()
        },
        cpu_name="simulated cpu",
        cpu_threads=2,
    )


def detection(**kwargs):  # type: ignore[no-untyped-def]
    return detect(inputs(**kwargs))
