"""Which DeepSpeed accelerator a run uses: decided by our vendor layer, `DS_ACCELERATOR` respected.

DeepSpeed picks its accelerator once per process (`deepspeed.accelerator.get_accelerator()`, cached):
from the `DS_ACCELERATOR` environment variable, else by probing installed vendor packages. Our vendor
layer has already decided which device the Trainer drives (accelerators/resolve.py), so before DeepSpeed
is first asked, `select_deepspeed_accelerator(device_type)`:

    DS_ACCELERATOR unset          -> set it to DeepSpeed's name for our device type (cpu, cuda, npu, ...)
    DS_ACCELERATOR = that name    -> kept
    DS_ACCELERATOR = another name -> error naming both and the fix (the Trainer and DeepSpeed would
                                     otherwise drive different devices)
    DeepSpeed already chose       -> its choice must agree, same error otherwise

DeepSpeed's accelerator names equal torch device types for every vendor it supports; ROCm answers to
"cuda" as in torch. Moore Threads (musa) has no DeepSpeed accelerator.
"""

from __future__ import annotations

import os
import sys

# torch device type -> DeepSpeed accelerator name (deepspeed/accelerator/real_accelerator.py)
DEEPSPEED_ACCELERATORS: dict[str, str] = {
    "cuda": "cuda",
    "cpu": "cpu",
    "npu": "npu",
    "xpu": "xpu",
    "mlu": "mlu",
    "mps": "mps",
    "hpu": "hpu",
}
ENV = "DS_ACCELERATOR"


class DeepSpeedAcceleratorError(RuntimeError):
    """The device the Trainer drives and DeepSpeed's accelerator disagree, or DeepSpeed has none for it."""


def deepspeed_accelerator_name(device_type: str) -> str:
    """DeepSpeed's accelerator name for a torch device type; a clear error when DeepSpeed has none."""
    try:
        return DEEPSPEED_ACCELERATORS[device_type]
    except KeyError:
        raise DeepSpeedAcceleratorError(
            f"DeepSpeed has no accelerator for torch device type {device_type!r} (it supports "
            f"{', '.join(sorted(DEEPSPEED_ACCELERATORS))}). Use strategy=expert_parallel on this device."
        ) from None


def _already_chosen() -> str | None:
    """DeepSpeed's cached accelerator name if DeepSpeed has already picked one in this process."""
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    accel = getattr(real, "ds_accelerator", None) if real is not None else None
    return accel.device_name() if accel is not None else None


def select_deepspeed_accelerator(device_type: str, environ: dict[str, str] | None = None) -> str:
    """Make DeepSpeed use `device_type`'s accelerator (sets DS_ACCELERATOR when unset); returns its name."""
    env = os.environ if environ is None else environ
    want = deepspeed_accelerator_name(device_type)
    given = env.get(ENV)
    if given is not None and given != want:
        raise DeepSpeedAcceleratorError(
            f"{ENV}={given} but the Trainer runs on {device_type!r} devices (accelerator config group). Unset "
            f"{ENV}, set it to {want}, or pick the matching accelerator=... so both drive the same device."
        )
    chosen = _already_chosen() if environ is None else None
    if chosen is not None and chosen != want:
        raise DeepSpeedAcceleratorError(
            f"DeepSpeed already chose its {chosen!r} accelerator in this process, but the Trainer runs on "
            f"{device_type!r} devices. Set {ENV}={want} before anything imports deepspeed."
        )
    env[ENV] = want
    return want
