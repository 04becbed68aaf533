"""A full or read-only disk is reported as such ("no space left on device"), not as torch's "unexpected pos".

The disks are real: a 1 MB tmpfs (full after the first write) and a read-only tmpfs, mounted for the test. Where
mounting is not permitted (no root) the test is skipped; /dev/full gives the same ENOSPC without a mount.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from moe_plugin.errors import StorageError, storage_reason
from moe_plugin.lightning.checkpoint_io import AsyncCheckpointIO, _HashingWriter, write_checkpoint_file


def _state(nbytes: int) -> dict:
    return {"global_step": 1, "state_dict": {"w": torch.zeros(nbytes // 4)}}


@pytest.fixture
def tmpfs(tmp_path: Path):
    mounted: list[Path] = []

    def mount(size: str = "1m", readonly: bool = False) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        opts = f"size={size}" + (",ro" if readonly else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True).returncode:
            pytest.skip("mounting a tmpfs is not permitted here")
        mounted.append(target)
        return target

    yield mount
    for m in mounted:
        subprocess.run(["umount", str(m)], capture_output=True)


def test_dev_full_is_reported_as_no_space_left() -> None:
    with open("/dev/full", "wb", buffering=0) as f:
        hw = _HashingWriter(f)
        with pytest.raises((RuntimeError, OSError)):  # torch's zip writer may reword it as "unexpected pos"
            torch.save(_state(1 << 20), hw)
    assert storage_reason(hw.error) == "no space left on device"


def test_full_disk_async_and_sync(tmpfs) -> None:
    disk = tmpfs("1m")
    with pytest.raises(StorageError, match="no space left on device") as err:
        write_checkpoint_file(_state(4 << 20), disk / "ckpts" / "last.ckpt")
    assert str(disk / "ckpts" / "last.ckpt") in str(err.value) and "unexpected pos" not in str(err.value)
    assert [p.name for p in (disk / "ckpts").iterdir()] == []  # no torn file, no temporary left

    io = AsyncCheckpointIO(async_save=True)
    io.save_checkpoint(_state(4 << 20), disk / "ckpts" / "a.ckpt")
    with pytest.raises(StorageError, match="no space left on device"):  # raised in the training thread
        io.teardown()


def test_read_only_disk(tmpfs) -> None:
    disk = tmpfs("1m", readonly=True)
    with pytest.raises(StorageError, match="read-only file system"):
        write_checkpoint_file(_state(1000), disk / "last.ckpt")
