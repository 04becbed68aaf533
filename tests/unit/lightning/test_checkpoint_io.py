"""AsyncCheckpointIO: snapshot isolation, atomic checksummed files, validity rules, newest valid checkpoint."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from moe_plugin.lightning.checkpoint_io import (
    AsyncCheckpointIO,
    CheckpointWriteError,
    CorruptCheckpointError,
    check_checkpoint,
    find_latest_valid,
    is_valid_checkpoint,
    remove_stale_temporaries,
    sidecar_path,
    snapshot_to_host,
    write_checkpoint_file,
)


def _ckpt(step: int, n: int = 1000) -> dict:
    torch.manual_seed(step)
    return {"global_step": step, "epoch": 0, "state_dict": {"w": torch.randn(n)}, "optimizer_states": [{"lr": 0.1}]}


def test_snapshot_is_isolated_and_keeps_tied_tensors():
    w = torch.randn(4, 4)
    state = {"a": w, "b": w.detach(), "nested": [w[0], (1, "x")]}
    snap = snapshot_to_host(state)
    w.add_(1.0)  # training goes on in place
    assert not torch.equal(snap["a"], w)
    assert snap["a"] is snap["b"]  # same storage and geometry -> one copy, torch.save writes it once
    assert snap["nested"][1] == (1, "x")


def test_async_save_is_atomic_checksummed_and_loads(tmp_path):
    io = AsyncCheckpointIO()
    ckpt = _ckpt(5)
    path = tmp_path / "ck" / "step5.ckpt"
    io.save_checkpoint(ckpt, path)
    ckpt["state_dict"]["w"].zero_()  # mutating after save must not reach the file
    io.teardown()
    side = json.loads(sidecar_path(path).read_text())
    assert side["bytes"] == path.stat().st_size and side["global_step"] == 5 and len(side["sha256"]) == 64
    loaded = io.load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], _ckpt(5)["state_dict"]["w"])
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_truncated_or_flipped_file_is_detected_on_load_and_skipped_by_find(tmp_path, caplog):
    io = AsyncCheckpointIO(async_save=False)
    for step in (2, 4, 6):
        io.save_checkpoint(_ckpt(step), tmp_path / f"step{step}.ckpt")
    newest = tmp_path / "step6.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated on disk
    assert not is_valid_checkpoint(newest)
    with pytest.raises(CorruptCheckpointError, match="step6.ckpt.*truncated"):
        io.load_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        assert find_latest_valid(tmp_path) == tmp_path / "step4.ckpt"
    assert "skipping checkpoint" in caplog.text and "step6.ckpt" in caplog.text
    mid = tmp_path / "step4.ckpt"
    raw = bytearray(mid.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one flipped byte
    mid.write_bytes(bytes(raw))
    assert "sha256" in check_checkpoint(mid).reason
    assert find_latest_valid(tmp_path) == tmp_path / "step2.ckpt"


def test_plain_files_are_a_fallback_and_temporaries_are_ignored(tmp_path):
    torch.save(_ckpt(9), tmp_path / "legacy.ckpt")  # no sidecar: loadable, lower priority
    write_checkpoint_file(_ckpt(3), tmp_path / "step3.ckpt")
    (tmp_path / ".step7.ckpt.tmp.123.0").write_bytes(b"partial")
    assert find_latest_valid(tmp_path) == tmp_path / "step3.ckpt"
    (tmp_path / "step3.ckpt").write_bytes(b"garbage")
    assert find_latest_valid(tmp_path) == tmp_path / "legacy.ckpt"
    (tmp_path / "legacy.ckpt").write_bytes(b"garbage")
    assert find_latest_valid(tmp_path) is None
    assert find_latest_valid(tmp_path / "missing") is None


def test_sharded_directory_rule(tmp_path):
    d = tmp_path / "step000010.ckpt"
    d.mkdir()
    meta = {
        "global_step": 10,
        "moe_plugin_layout": {"format_version": 1, "shard_files": ["experts_r0.pt", "experts_r1.pt"]},
    }
    write_checkpoint_file(meta, d / "meta.pt")
    write_checkpoint_file({"e": torch.ones(3)}, d / "experts_r0.pt")
    assert "shard experts_r1.pt: missing" in check_checkpoint(d).reason
    write_checkpoint_file({"e": torch.ones(3)}, d / "experts_r1.pt")
    assert is_valid_checkpoint(d)
    write_checkpoint_file(_ckpt(4), tmp_path / "step000004.ckpt")
    assert find_latest_valid(tmp_path) == d
    (d / "experts_r1.pt").write_bytes(b"x")
    assert find_latest_valid(tmp_path) == tmp_path / "step000004.ckpt"


def test_remove_waits_and_removes_sidecar(tmp_path):
    io = AsyncCheckpointIO()
    path = tmp_path / "a.ckpt"
    io.save_checkpoint(_ckpt(1, n=200_000), path)
    io.remove_checkpoint(path)
    assert not path.exists() and not sidecar_path(path).exists()


def test_background_failure_surfaces_in_the_training_thread(tmp_path):
    io = AsyncCheckpointIO()
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    io.save_checkpoint(_ckpt(1), blocker / "a.ckpt")  # parent is a file: the write fails in the thread
    with pytest.raises(CheckpointWriteError, match="a.ckpt"):
        io.teardown()


def test_bad_option():
    with pytest.raises(ValueError, match="checkpoint_io.max_pending=0"):
        AsyncCheckpointIO(max_pending=0)


def test_snapshot_buffers_are_reused_after_the_write(tmp_path):
    io = AsyncCheckpointIO()
    ckpt = _ckpt(1)
    io.save_checkpoint(ckpt, tmp_path / "a.ckpt")
    io.wait()
    assert io.pool.nbytes >= ckpt["state_dict"]["w"].numel() * 4  # buffers returned to the pool
    ckpt["state_dict"]["w"].add_(1.0)
    io.save_checkpoint(ckpt, tmp_path / "b.ckpt")
    assert io.pool.nbytes == 0  # taken by the second snapshot
    io.teardown()
    assert torch.equal(io.load_checkpoint(tmp_path / "b.ckpt")["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert not torch.equal(io.load_checkpoint(tmp_path / "a.ckpt")["state_dict"]["w"], ckpt["state_dict"]["w"])


def test_stale_temporaries_are_removed_fresh_ones_kept(tmp_path):
    import os
    import time

    old = tmp_path / ".step4.ckpt.tmp.123.0"
    fresh = tmp_path / ".step6.ckpt.tmp.456.0"
    nested = tmp_path / "step8.ckpt"
    nested.mkdir()
    old_shard = nested / ".experts_r1.pt.tmp.789.2"
    for p in (old, fresh, old_shard):
        p.write_bytes(b"partial")
    past = time.time() - 7200
    os.utime(old, (past, past))
    os.utime(old_shard, (past, past))
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([old, old_shard])
    assert fresh.exists() and not old.exists()


def test_sharded_directory_writes_through_the_io_and_waits_as_a_whole(tmp_path):
    io = AsyncCheckpointIO()
    d = tmp_path / "step000012.ckpt"
    shards = [f"experts_r{r}.pt" for r in range(3)]
    for name in shards:
        io.save_checkpoint({"e": torch.randn(50_000)}, d / name)
    io.save_checkpoint({"global_step": 12, "moe_plugin_layout": {"shard_files": shards}}, d / "meta.pt")
    io.wait(d)  # every file under the directory is on disk
    assert is_valid_checkpoint(d)
    io.remove_checkpoint(d)
    assert not d.exists()
