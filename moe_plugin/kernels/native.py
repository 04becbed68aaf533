"""Compiled CPU kernels (moe_plugin/kernels/csrc): built once per machine on first use, then loaded from a cache.

The package ships C++ sources, not binaries: a wheel built against one torch would not load in another, and
`pip install -e .` cannot see torch in pip's isolated build environment. So the first process that needs a
kernel compiles it with the machine's C++ compiler against the installed torch (about 25 s), into

    $MOE_PLUGIN_KERNEL_CACHE, else $XDG_CACHE_HOME/moe_plugin/kernels, else ~/.cache/moe_plugin/kernels
        <name>-<hash of sources, torch version, compiler, flags>/lib<name>.so

and every later process (other ranks, the next run) only loads it. Concurrent first uses (two ranks) take a
file lock; the library is written under a temporary name and renamed, so a killed build leaves nothing half
written. No build tool beyond the compiler is needed (no ninja). Where it cannot be built (no compiler, a
non-Linux platform, MOE_PLUGIN_NATIVE_KERNELS=0), `native_ops()` returns None and callers keep their
Python path, which computes the same thing; `native_status()` says why (`moe-plugin doctor`).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

NAME = "moe_plugin_cpu"
SOURCES = ("swiglu_experts.cpp",)
CSRC = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fvisibility=hidden")
DISABLE_ENV = "MOE_PLUGIN_NATIVE_KERNELS"
CACHE_ENV = "MOE_PLUGIN_KERNEL_CACHE"


class NativeKernelError(RuntimeError):
    """The compiled CPU kernels could not be built or loaded (the message says why and what to do)."""


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "moe_plugin" / "kernels"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _compile_command(compiler: str, source: Path, out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    return [*cmd, *(f"-I{p}" for p in include_paths()), "-c", str(source), "-o", str(out)]


def _link_command(compiler: str, objects: list[Path], out: Path) -> list[str]:
    from torch.utils.cpp_extension import library_paths

    cmd = [compiler, "-shared", "-fopenmp", *(str(o) for o in objects)]
    for lib_dir in library_paths():
        cmd += [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}"]
    return [*cmd, "-lc10", "-ltorch_cpu", "-ltorch", "-o", str(out)]


def _build_key(compiler: str, sources: list[Path]) -> str:
    h = hashlib.sha256()
    for part in (torch.__version__, sys.version, compiler, " ".join(FLAGS), str(torch._C._GLIBCXX_USE_CXX11_ABI)):
        h.update(part.encode())
    for src in sources:
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def library_path(compiler: str, cache: Path | None = None) -> Path:
    """Where the library for these sources, this torch and this compiler is (or will be) cached."""
    key = _build_key(compiler, [CSRC / s for s in SOURCES])
    return (cache or cache_root()) / f"{NAME}-{key}" / f"lib{NAME}.so"


def build(cache: Path | None = None, quiet: bool = False) -> Path:
    """Compile the kernels (or find them already compiled); returns the shared library's path."""
    if not sys.platform.startswith("linux"):
        raise NativeKernelError(f"the compiled CPU kernels are built on Linux only (this is {sys.platform}).")
    compiler = _compiler()
    if compiler is None:
        raise NativeKernelError("no C++ compiler found (c++, g++, clang++ or $CXX): install one, e.g. g++.")
    sources = [CSRC / s for s in SOURCES]
    lib = library_path(compiler, cache)
    folder = lib.parent
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key: wait for it
        if lib.exists():
            return lib
        if not quiet:
            print(f"moe_plugin: compiling the CPU expert kernels once (about 25 s) into {folder}", file=sys.stderr)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
        os.close(fd)
        objects = [Path(f"{tmp}.{i}.o") for i in range(len(sources))]
        try:
            # One compiler process per source at once (the torch headers dominate each), then one link.
            jobs = [subprocess.Popen(_compile_command(compiler, s, o), **_PIPES) for s, o in zip(sources, objects)]
            results = []
            for job in jobs:
                out, err = job.communicate()
                results.append((job.returncode, out, err))
            if all(r[0] == 0 for r in results):
                link = subprocess.run(_link_command(compiler, objects, Path(tmp)), **_PIPES)
                results.append((link.returncode, link.stdout, link.stderr))
            if any(r[0] != 0 for r in results):
                (folder / "build.log").write_text("".join(out + err for _, out, err in results))
                raise NativeKernelError(
                    f"compiling {', '.join(SOURCES)} failed (log: {folder / 'build.log'}); set "
                    f"{DISABLE_ENV}=0 to use the Python path."
                )
            os.replace(tmp, lib)
        finally:
            for leftover in (tmp, *objects):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    return lib


_PIPES = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "off", "no")


@functools.cache
def _load() -> tuple[object | None, str]:
    if _disabled():
        return None, f"disabled ({DISABLE_ENV}=0)"
    try:
        lib = build()
        torch.ops.load_library(str(lib))
        return torch.ops.moe_plugin_cpu, f"compiled ({lib})"
    except (NativeKernelError, OSError, RuntimeError) as err:
        warnings.warn(f"moe_plugin: compiled CPU kernels unavailable, using the Python path: {err}", stacklevel=3)
        return None, f"unavailable: {err}"


def native_ops() -> object | None:
    """`torch.ops.moe_plugin_cpu` (built and loaded on the first call), or None where it cannot be had."""
    return _load()[0]


def native_status(build_now: bool = True) -> str:
    """One line for `moe-plugin doctor`: compiled (where) / disabled / unavailable (why). With
    `build_now=False` nothing is compiled: a library not built yet is reported as such."""
    if build_now or _load.cache_info().currsize:
        return _load()[1]
    if _disabled():
        return f"disabled ({DISABLE_ENV}=0)"
    compiler = _compiler()
    if compiler is None:
        return "unavailable: no C++ compiler found (the Python path serves)"
    lib = library_path(compiler)
    return (
        f"compiled ({lib})" if lib.exists() else f"not built yet: compiled on first use (about 25 s) into {lib.parent}"
    )
