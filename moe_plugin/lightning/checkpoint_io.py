"""Asynchronous, atomic, checksummed checkpoint files, and finding the newest valid checkpoint.

How a save works (the training step is blocked only for step 1):

    1. snapshot   every tensor of the checkpoint dict is copied to host memory (training then goes on and
                  may change the originals in place)
    2. persist    a background thread streams torch.save into `.<name>.tmp.<pid>.<n>` next to the target,
                  hashing the bytes as they are written (sha256), then flush + fsync
    3. publish    os.replace(temporary, target) (atomic on POSIX), then the sidecar `<target>.sha256`
                  = {"sha256", "bytes", "global_step", "epoch"} written the same way, then fsync of the folder

A crash during 2 leaves only a hidden temporary file; a crash between the two renames of 3 leaves a complete
file without a sidecar (treated as a plain file, see below). Loading verifies size and sha256 first.

Reading: every load goes through `load_weights_only` (torch.load with weights_only=True): a checkpoint holds
tensors and plain data only, so a crafted file cannot run code when resumed or inspected; one that needs more is
refused with UnsafeCheckpointError naming the file (a checksum proves integrity, not good intent).

Validity (what resume=auto accepts):
    file       its sidecar matches (size, then sha256); without a sidecar it is a plain/legacy file, valid if
               load_weights_only can read it
    directory  (expert-parallel sharded) `meta.pt` and every file listed in
               meta["moe_plugin_layout"]["shard_files"] exist, and each sidecar matches
`find_latest_valid(folder)` tries checkpoints with sidecars newest first (by global step, then mtime) and
falls back to plain ones only if none is valid, logging every checkpoint it skips and why.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO

from moe_plugin.errors import CheckpointError, StorageError, UnsafeCheckpointError, storage_reason

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
META_FILE = "meta.pt"
_CHUNK = 1 << 22


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose bytes do not match its checksum sidecar (truncated, partially copied, bit rot)."""


class CheckpointWriteError(RuntimeError):
    """A background checkpoint write failed; raised in the training thread at the next save or at teardown."""


# ---------------------------------------------------------------------------------------------------- snapshot
class HostBufferPool:
    """Reusable host tensors for snapshots, keyed by (shape, dtype).

    Copying into memory the process already touched is several times faster than into fresh allocations (no
    page faults, no zeroing by the kernel): the first snapshot allocates, later ones reuse the buffers of
    snapshots whose write finished. This is the "host memory buffer" of DLRover's Flash Checkpoint, kept in
    process memory instead of shared memory. Thread-safe (the writer thread releases, the trainer acquires).
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def acquire(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype)
        with self._lock:
            bucket = self._free.get(key)
            if bucket:
                return bucket.pop()
        return torch.empty(like.shape, dtype=like.dtype, device="cpu")

    def release(self, tensors: list[torch.Tensor]) -> None:
        with self._lock:
            for t in tensors:
                self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for ts in self._free.values() for t in ts)


def snapshot_to_host(
    obj: Any, pool: HostBufferPool | None = None, _memo: dict[tuple, torch.Tensor] | None = None
) -> Any:
    """A copy of `obj` whose tensors live in host memory and share nothing with the originals.

    Tensors that view the same storage with the same geometry (tied weights) map to one copy, so torch.save
    still writes them once. Containers are rebuilt; other objects (numbers, strings) are immutable or opaque.
    With a `pool`, tensors are copied into reused buffers (see HostBufferPool).
    """
    memo = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.dtype)
        if obj.numel() > 0 and key in memo:
            return memo[key]
        if pool is None or obj.is_sparse or obj.numel() == 0:
            out = obj.detach().to("cpu", copy=True)
        else:
            out = pool.acquire(obj)
            out.copy_(obj.detach())
        memo[key] = out
        return out
    if isinstance(obj, dict):
        new = copy.copy(obj)  # keeps the dict subclass (OrderedDict, AttributeDict)
        for k, v in obj.items():
            new[k] = snapshot_to_host(v, pool, memo)
        return new
    if isinstance(obj, list):
        return [snapshot_to_host(v, pool, memo) for v in obj]
    if isinstance(obj, tuple):
        items = [snapshot_to_host(v, pool, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    return obj


def _tensors_of(obj: Any, out: list[torch.Tensor], seen: set[int]) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen and not obj.is_sparse and obj.numel() > 0:
            seen.add(id(obj))
            out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_of(v, out, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_of(v, out, seen)
    return out


# ---------------------------------------------------------------------------------------------------- writing
class _HashingWriter(io.RawIOBase):
    """File object that hashes and counts the bytes it forwards (torch.save writes sequentially)."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.error: OSError | None = None  # torch.save turns a failed write into "unexpected pos ...": keep it

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        try:
            return self.f.write(b)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


_tmp_counter = count()


def _tmp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp.{os.getpid()}.{next(_tmp_counter)}"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not fsync directories
    finally:
        os.close(fd)


def _replace_atomically(path: Path, writer: Callable[[io.BufferedWriter], None], fsync: bool) -> None:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            writer(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sidecar_path(path: Path | str) -> Path:
    p = Path(path)
    return p.parent / (p.name + SIDECAR_SUFFIX)


def write_checkpoint_file(checkpoint: dict[str, Any], path: Path | str, fsync: bool = True) -> dict[str, Any]:
    """torch.save `checkpoint` to `path` atomically with its checksum sidecar; returns the sidecar record."""
    path = Path(path)
    record: dict[str, Any] = {}
    writers: list[_HashingWriter] = []

    def write_data(f: io.BufferedWriter) -> None:
        hw = _HashingWriter(f)
        writers.append(hw)
        torch.save(checkpoint, hw)
        record.update(sha256=hw.sha.hexdigest(), bytes=hw.nbytes)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace_atomically(path, write_data, fsync)
    except Exception as err:
        lost = writers[0].error if writers and writers[0].error is not None else err
        reason = storage_reason(lost)
        if reason is None:
            raise
        raise StorageError(
            f"cannot write checkpoint {path}: {reason} ({_free_space(path.parent)}). Free space or point "
            "callbacks.model_checkpoint.dirpath (or paths.output_dir) at a writable disk; the previous checkpoints "
            "are intact."
        ) from err
    record["global_step"] = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    record["epoch"] = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    text = json.dumps(record).encode()
    _replace_atomically(sidecar_path(path), lambda f: f.write(text), fsync)
    if fsync:
        _fsync_dir(path.parent)
    return record


# ---------------------------------------------------------------------------------------------------- reading
def load_weights_only(path: Path | str, map_location: Any = "cpu", mmap: bool = True) -> Any:
    """torch.load(path, weights_only=True): tensors, containers and plain values only, never code.

    Raises UnsafeCheckpointError for a file that needs arbitrary Python objects (a pickle that could run code:
    moe_plugin's own checkpoints never do) and CheckpointError for one that is empty, truncated or not a torch
    file; both name the file. `mmap` reads tensors lazily (inspecting a large file reads its metadata only).
    """
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not (mmap and "mmap can only be used" in str(err)):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        refused = next((line for line in str(err).splitlines() if "global" in line.lower()), "")
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {path}: it holds Python objects other than tensors and plain data "
            f"({refused.strip() or 'weights_only=True refuses it'}); loading it could run arbitrary code. moe_plugin "
            "checkpoints never need this: use a checkpoint written by moe_plugin/Lightning, or one you re-save "
            "as a plain state_dict."
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError) as err:
        size = path.stat().st_size if path.is_file() else None
        what = (
            "an empty file"
            if size == 0
            else f"not a readable torch checkpoint ({type(err).__name__}: {_first_line(err)})"
        )
        raise CheckpointError(
            f"checkpoint {path} is {what}: truncated, still being written, or not a checkpoint. Use another one "
            "(resume=auto picks the newest valid checkpoint)."
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else "")[:200]


def _free_space(folder: Path) -> str:
    """'12.3 MB free on <folder>', for the message of a failed write (best effort)."""
    for p in (folder, *folder.parents):
        if p.exists():
            try:
                return f"{shutil.disk_usage(p).free / 1e6:,.1f} MB free on {p}"
            except OSError:
                break
    return f"free space on {folder} unknown"


# ---------------------------------------------------------------------------------------------------- validity
@dataclass
class CheckpointCheck:
    path: Path
    valid: bool
    reason: str
    has_sidecar: bool
    global_step: int | None = None


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    side = sidecar_path(path)
    if not side.exists():
        return None
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError):
        return {"sha256": "unreadable", "bytes": -1}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: Path | str, deep: bool = True) -> CheckpointCheck:
    """Validity of one checkpoint file (size, then sha256 if `deep`; torch.load for plain files)."""
    path = Path(path)
    if not path.is_file():
        return CheckpointCheck(path, False, "missing", False)
    side = _read_sidecar(path)
    if side is None:
        try:
            obj = load_weights_only(path)
        except UnsafeCheckpointError as err:
            return CheckpointCheck(path, False, f"unsafe, not loaded: {err}", False)
        except CheckpointError as err:  # any unreadable file is simply not a checkpoint we can resume from
            return CheckpointCheck(path, False, f"no sidecar and it cannot be read ({err})", False)
        step = obj.get("global_step") if isinstance(obj, dict) else None
        return CheckpointCheck(path, True, "plain file (no sidecar), readable", False, step)
    step = side.get("global_step")
    size = path.stat().st_size
    if size != side.get("bytes"):
        return CheckpointCheck(
            path, False, f"size {size} bytes != {side.get('bytes')} in the sidecar (truncated?)", True, step
        )
    if deep and sha256_of(path) != side.get("sha256"):
        return CheckpointCheck(path, False, "sha256 does not match the sidecar (corrupted)", True, step)
    return CheckpointCheck(path, True, "checksum ok" if deep else "size ok", True, step)


def check_checkpoint(path: Path | str, deep: bool = True) -> CheckpointCheck:
    """Validity of a checkpoint file or sharded directory (see the module docstring)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return CheckpointCheck(path, False, "dangling symlink", False)
    if not path.is_dir():
        return check_file(path.resolve() if path.is_symlink() else path, deep)
    meta = check_file(path / META_FILE, deep)
    if not meta.valid:
        return CheckpointCheck(path, False, f"{META_FILE}: {meta.reason}", meta.has_sidecar, meta.global_step)
    try:
        obj = load_weights_only(path / META_FILE)
        shards = list(obj.get("moe_plugin_layout", {}).get("shard_files", []))
        # files other writers keep in the directory that resuming needs too (local_sgd: the other islands' parts)
        shards += list(obj.get("moe_plugin_extra_files", []))
        step = obj.get("global_step", meta.global_step)
    except UnsafeCheckpointError as err:
        return CheckpointCheck(path, False, f"unsafe, not loaded: {err}", meta.has_sidecar)
    except (CheckpointError, AttributeError) as err:
        return CheckpointCheck(path, False, f"{META_FILE} unreadable ({err})", meta.has_sidecar)
    all_sidecars = meta.has_sidecar
    for name in shards:
        c = check_file(path / name, deep)
        if not c.valid:
            return CheckpointCheck(path, False, f"shard {name}: {c.reason}", meta.has_sidecar, step)
        all_sidecars = all_sidecars and c.has_sidecar
    return CheckpointCheck(path, True, f"{META_FILE} and {len(shards)} shard(s) ok", all_sidecars, step)


def is_valid_checkpoint(path: Path | str) -> bool:
    """The checkpoint file or directory at `path` can be resumed from (see the module docstring)."""
    return check_checkpoint(path).valid


def list_checkpoints(folder: Path | str) -> list[Path]:
    """Checkpoint candidates in `folder`: `*.ckpt`/`*.pt` files and directories holding a meta.pt.

    Hidden names (temporaries of an interrupted write) and sidecars are not candidates.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        if p.name.startswith(".") or p.name.endswith(SIDECAR_SUFFIX):
            continue
        if (p.is_dir() and (p / META_FILE).exists()) or (p.suffix in (".ckpt", ".pt") and not p.is_dir()):
            out.append(p)
    return out


def remove_stale_temporaries(folder: Path | str, older_than_s: float = 3600.0) -> list[Path]:
    """Delete temporaries left by writes that were killed (`.<name>.tmp.<pid>.<n>`, also inside sharded
    checkpoint directories) older than `older_than_s`; the age keeps writes in flight elsewhere safe."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed = []
    for p in [*folder.glob(".*.tmp.*"), *folder.glob("*/.*.tmp.*")]:
        try:
            if p.is_file() and now - p.stat().st_mtime > older_than_s:
                p.unlink()
                removed.append(p)
        except OSError:
            pass  # another process removed or is replacing it
    if removed:
        log.info("removed %d stale temporary checkpoint file(s) in %s", len(removed), folder)
    return removed


def find_latest_valid(folder: Path | str, deep: bool = True) -> Path | None:
    """The newest valid checkpoint in `folder` (or None), logging each newer one that was skipped and why.

    Order: checkpoints with sidecars by (global step, mtime) descending; only if none of them is valid, plain
    files by mtime descending (torch.load must succeed on them).
    """
    candidates = list_checkpoints(folder)

    def key(p: Path) -> tuple[int, float]:
        target = p / META_FILE if p.is_dir() else p
        side = _read_sidecar(target.resolve()) or {}
        step = side.get("global_step")
        return (step if isinstance(step, int) else -1, target.stat().st_mtime if target.exists() else 0.0)

    with_sidecar = [p for p in candidates if sidecar_path((p / META_FILE if p.is_dir() else p).resolve()).exists()]
    plain = [p for p in candidates if p not in with_sidecar]
    for group in (sorted(with_sidecar, key=key, reverse=True), sorted(plain, key=key, reverse=True)):
        for p in group:
            check = check_checkpoint(p, deep)
            if check.valid:
                return p
            log.warning("resume: skipping checkpoint %s: %s", p, check.reason)
    return None


# ---------------------------------------------------------------------------------------------------- the plugin
class AsyncCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO: snapshot to host memory, write in a background thread, atomically, checksummed.

    Args:
        async_save: False writes in the calling thread (still atomic and checksummed).
        fsync: fsync files and folders before publishing (durability across power loss; costs write time,
            not step time when async).
        verify_on_load: check size and sha256 against the sidecar before loading. Loading is always
            weights_only (load_weights_only), whatever Lightning asks for.
        max_pending: snapshots allowed in flight; a save beyond that waits for the oldest write. Host memory
            for snapshots is at most max_pending copies of the state; the buffers are kept and reused between
            saves (HostBufferPool), so the steady-state cost of a save is one memcpy into warm memory.
    """

    def __init__(
        self, async_save: bool = True, fsync: bool = True, verify_on_load: bool = True, max_pending: int = 2
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"checkpoint_io.max_pending={max_pending} must be >= 1.")
        self.async_save = async_save
        self.fsync = fsync
        self.verify_on_load = verify_on_load
        self.max_pending = max_pending
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self.pool = HostBufferPool()
        self.last_snapshot_seconds = 0.0  # time the caller was blocked in the last save (for benchmarks)
        atexit.register(self._flush_quietly)

    # -- writing
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options (got {storage_options!r}).")
        t0 = time.perf_counter()
        self._raise_errors()
        target = Path(path)
        self.wait(target)  # a rewrite of the same name (last.ckpt) lands after the previous one
        while len(self._pending) >= self.max_pending:
            oldest = next(iter(self._pending))
            self.wait(oldest)
        if not self.async_save:  # no snapshot needed: the caller waits for the write
            write_checkpoint_file(checkpoint, target, self.fsync)
            self.last_snapshot_seconds = time.perf_counter() - t0
            return
        snap = snapshot_to_host(checkpoint, self.pool)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-ckpt-writer")
        future = self._executor.submit(self._write_and_release, snap, target)
        with self._lock:
            self._pending[str(target)] = future
        future.add_done_callback(lambda f, key=str(target): self._done(key, f))
        self.last_snapshot_seconds = time.perf_counter() - t0

    def _write_and_release(self, snap: dict[str, Any], target: Path) -> None:
        try:
            write_checkpoint_file(snap, target, self.fsync)
        finally:
            self.pool.release(_tensors_of(snap, [], set()))  # the buffers serve the next snapshot

    def _done(self, key: str, future: Future) -> None:
        with self._lock:
            if self._pending.get(key) is future:
                del self._pending[key]
            err = future.exception()
            if isinstance(err, StorageError):  # a full or read-only disk is the user's to fix: keep its one line
                self._errors.append(err)
            elif err is not None:
                self._errors.append(CheckpointWriteError(f"writing checkpoint {key} failed: {err!r}"))

    def _raise_errors(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def wait(self, path: Any | None = None) -> None:
        """Block until the write of `path` (a file, or every file under a sharded checkpoint directory; every
        pending write if None) is on disk."""
        with self._lock:
            if path is None:
                futures = list(self._pending.values())
            else:
                key = str(Path(path))
                futures = [f for k, f in self._pending.items() if k == key or k.startswith(key + os.sep)]
        for f in futures:
            if f is not None:
                try:
                    f.result()
                except Exception:
                    pass  # reported by _raise_errors
        if path is None:
            self._raise_errors()

    def _flush_quietly(self) -> None:
        try:
            self.wait()
        except Exception as err:  # at interpreter exit there is nobody left to raise to
            log.error("checkpoint flush at exit: %s", err)

    # -- reading and removing
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # `weights_only` is accepted for Lightning's signature and ignored: False would let a file run code
        target = Path(path)
        self.wait(target)
        if not target.exists():
            raise FileNotFoundError(f"Checkpoint file not found: {target}")
        if self.verify_on_load and target.is_file() and sidecar_path(target.resolve()).exists():
            # without a sidecar there is nothing to verify against: the weights_only load below is the check
            check = check_file(target.resolve(), deep=True)
            if not check.valid:
                raise CorruptCheckpointError(
                    f"checkpoint {target} is not valid: {check.reason}. Resume from an earlier one "
                    "(resume=auto skips invalid checkpoints) or restore the file."
                )
        return load_weights_only(target, map_location=map_location, mmap=False)

    def remove_checkpoint(self, path: Any) -> None:
        target = Path(path)
        self.wait(target)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists() or target.is_symlink():
            target.unlink()
        side = sidecar_path(target)
        if side.exists():
            side.unlink()

    def teardown(self) -> None:
        """Flush: every pending write is on disk when this returns (Lightning calls it at the end of fit)."""
        self.wait()
