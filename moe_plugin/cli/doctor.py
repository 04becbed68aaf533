"""`moe-plugin doctor`: what this machine offers for training, and what to install when something is missing.

Reports the detected vendors (devices, names, memory), the collective backend per vendor and which
torch.distributed backends are compiled in, precision support (bf16 and fp8, checked on the device
where that is possible), the grouped-matmul path, the matching catalog entry, and library versions.
Everything comes from `moe_plugin.accelerators.detect` (run once); nothing is assumed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from typing import Any

import torch

from moe_plugin.accelerators.detect import Detection, PresentVendor, detected
from moe_plugin.accelerators.profiles import PROFILES, VendorProfile, default_backend

HELP = "Report the detected accelerators, backends, precision support, kernel paths and library versions."

LIBRARIES = ("torch", "lightning", "hydra-core", "omegaconf", "wandb", "numpy", "deepspeed", "transformers")
DIST_BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _bf16_check(profile: VendorProfile) -> str:
    """'yes' only when a bf16 matmul actually ran on the device (CPU and present devices)."""
    if not profile.bf16:
        return "no (vendor stack)"
    try:
        device = torch.device(profile.device_type, 0) if profile.device_type != "cpu" else torch.device("cpu")
        a = torch.ones(8, 8, dtype=torch.bfloat16, device=device)
        ok = bool(((a @ a).float() == 8).all())
        return "yes (bf16 matmul ran)" if ok else "wrong results"
    except Exception as err:  # the device refused bf16
        return f"no ({type(err).__name__})"


def _fp8_check(profile: VendorProfile, pv: PresentVendor) -> str:
    if not profile.fp8:
        return "no (vendor stack)"
    if profile.name == "cuda":
        caps = [d.capability for d in pv.devices if d.capability]
        if caps:
            return "yes (sm >= 8.9)" if min(caps) >= (8, 9) else f"no (compute capability {min(caps)})"
    return "device-dependent (see the hardware catalog)"


def _grouped_mm_status(profile: VendorProfile) -> str:
    path = profile.grouped_mm
    if path == "loop":
        return "loop (reference fallback; no vendor grouped GEMM wired)"
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return f"{path} (module {module_name} missing: loop fallback)"
    return f"{path} (available)" if hasattr(module, attr) else f"{path} (missing in this build: loop fallback)"


def _kernel_paths(device_type: str) -> dict[str, str] | None:
    """What moe_plugin.kernels' automatic grouped-matmul choice resolves to here, per dtype."""
    try:
        kernels = importlib.import_module("moe_plugin.kernels")
    except ImportError:
        return None
    select = getattr(kernels, "select_grouped_mm", None)
    name_of = getattr(kernels, "grouped_mm_backend_name", None)
    if not (callable(select) and callable(name_of)):
        return None
    out = {}
    if device_type == "cpu":  # the routed experts' SwiGLU node; doctor reports, it does not compile
        out["compiled CPU experts"] = kernels.native_status(build_now=False)
    for dtype in (torch.float32, torch.bfloat16):
        try:
            out[str(dtype).replace("torch.", "")] = str(name_of(select("auto", device_type, dtype)))
        except Exception as err:  # a device that cannot even be probed
            out[str(dtype).replace("torch.", "")] = f"unavailable ({type(err).__name__})"
    return out


def collect(det: Detection | None = None) -> dict[str, Any]:
    """The doctor report as a dict (what --json prints)."""
    det = det or detected()
    inputs = det.inputs
    vendors = []
    for name, pv in det.present.items():
        p = pv.profile
        vendors.append(
            {
                "name": name,
                "vendor": p.vendor,
                "device_type": p.device_type,
                "device_count": pv.count if name != "cpu" else 1,
                "devices": [
                    {
                        "index": d.index,
                        "name": d.name,
                        "memory_gb": round(d.memory_bytes / 2**30, 1) if d.memory_bytes else None,
                    }
                    for d in pv.devices
                ],
                "backend": default_backend(p.device_type),
                "bf16": _bf16_check(p),
                "fp8": _fp8_check(p, pv),
                "grouped_mm": _grouped_mm_status(p),
                "lightning_accelerator": p.lightning_name,
                "catalog_entry": _catalog_name(pv),
            }
        )
    missing = [
        {"name": n, "vendor": p.vendor, "install": p.install_hint}
        for n, p in PROFILES.items()
        if n not in det.present and not (n == "cuda" and "rocm" in det.present)
    ]
    dist = torch.distributed
    report = {
        "selected": det.primary.profile.name,
        "vendors": vendors,
        "not_detected": missing,
        "torch": {"version": inputs.torch_version, "cuda": inputs.cuda_version, "hip": inputs.hip_version},
        "torch_accelerator": inputs.current_accelerator,
        "cpu": {"name": inputs.cpu_name, "threads": inputs.cpu_threads},
        "vendor_extensions": dict(inputs.extensions),
        "distributed_backends": {b: bool(getattr(dist, f"is_{b}_available", lambda: False)()) for b in DIST_BACKENDS}
        if dist.is_available()
        else {},
        "kernel_paths": _kernel_paths(det.primary.profile.device_type),
        "libraries": {lib: _version(lib) for lib in LIBRARIES},
    }
    return report


def _catalog_name(pv: PresentVendor) -> str | None:
    from moe_plugin.accelerators.catalog import load_catalog, match_device

    if pv.profile.name == "cpu":
        return "cpu (peak measured at run time)"
    catalog = load_catalog()
    for d in pv.devices:
        spec = match_device(d.name, catalog)
        if spec is not None:
            return spec.name
    return None


def format_report(r: dict[str, Any]) -> str:
    lines = [f"accelerator=auto selects: {r['selected']}", ""]
    for v in r["vendors"]:
        lines.append(
            f"[{v['name']}] {v['vendor']}  device type {v['device_type']!r}, Lightning accelerator {v['lightning_accelerator']!r}"
        )
        for d in v["devices"]:
            mem = f", {d['memory_gb']} GB" if d["memory_gb"] else ""
            lines.append(f"    device {d['index']}: {d['name']}{mem}")
        lines.append(f"    collective backend: {v['backend']}")
        lines.append(f"    bf16: {v['bf16']}   fp8: {v['fp8']}")
        lines.append(f"    grouped matmul: {v['grouped_mm']}")
        lines.append(f"    hardware catalog: {v['catalog_entry'] or 'no entry (add conf/hardware/<name>.yaml)'}")
    t = r["torch"]
    lines += [
        "",
        f"torch {t['version']} (cuda {t['cuda']}, hip {t['hip']}); torch.accelerator: {r['torch_accelerator']}",
    ]
    lines.append(f"cpu: {r['cpu']['name']}, {r['cpu']['threads']} threads")
    if r["distributed_backends"]:
        lines.append(
            "torch.distributed backends: "
            + ", ".join(f"{b}={'yes' if ok else 'no'}" for b, ok in r["distributed_backends"].items())
        )
    lines.append("vendor extensions: " + ", ".join(f"{m}={s}" for m, s in r["vendor_extensions"].items()))
    if r["kernel_paths"] is not None:
        paths = ", ".join(f"{k}={v}" for k, v in r["kernel_paths"].items())
        lines.append(f"expert grouped matmul chosen by moe_plugin.kernels (auto) on {r['selected']}: {paths}")
    lines.append("libraries: " + ", ".join(f"{k}={v or 'not installed'}" for k, v in r["libraries"].items()))
    if r["not_detected"]:
        lines += ["", "Not detected (to use one, install):"]
        lines += [f"    {m['name']:5s} {m['vendor']}: {m['install']}" for m in r["not_detected"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
