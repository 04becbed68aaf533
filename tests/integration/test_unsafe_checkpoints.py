"""A crafted checkpoint never runs code: every entry point that reads checkpoints refuses it by name.

The planted files are pickles whose loading would run `touch MARKER` (os.system through __reduce__). They get
valid checksum sidecars (an attacker who can write a checkpoint can write its sidecar too), so the checksum
check passes and only weights_only loading stands in the way. Entry points: `ckpt_path=` (a file, and an
expert-parallel folder), `resume=PATH`, `resume=auto` (a file planted in the run's checkpoint folder),
`moe-plugin ckpt inspect` and `consolidate`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_plugin.cli.main import main as cli_main
from moe_plugin.lightning.checkpoint_io import write_checkpoint_file

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "experiment=tiny_smoke",
    "logger=none",
    "model.num_layers=1",
    "data.seq_len=32",
    "data.source.max_bytes=100000",
    "trainer.max_steps=2",
]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker puts in a checkpoint: a call made while unpickling
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path, **extra) -> Path:
    write_checkpoint_file({"global_step": 10**6, "epoch": 0, "state_dict": {}, "x": _Payload(marker), **extra}, path)
    return path


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _refused(proc: subprocess.CompletedProcess, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the planted checkpoint ran code"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(path) in proc.stderr and "refusing to load" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_entry_points_refuse_a_planted_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    evil = _plant(tmp_path / "evil.ckpt", marker)
    _refused(_train(tmp_path, f"ckpt_path={evil}"), evil, marker)
    _refused(_train(tmp_path, f"resume={evil}"), evil, marker)

    folder = tmp_path / "sharded"
    _plant(folder / "meta.pt", marker, moe_plugin_layout={"shard_files": []})
    proc = _train(tmp_path, f"ckpt_path={folder}", "strategy=expert_parallel", "strategy.expert_parallel_size=1")
    _refused(proc, folder / "meta.pt", marker)

    run = tmp_path / "run"
    planted = _plant(run / "checkpoints" / "last.ckpt", marker)
    _refused(_train(tmp_path, f"hydra.run.dir={run}", "resume=auto"), planted, marker)


def test_resume_auto_skips_a_planted_file_without_sidecar_by_name(tmp_path: Path, caplog) -> None:
    import torch
    from omegaconf import OmegaConf

    from moe_plugin.lightning.resume import resolve_resume

    marker = tmp_path / "MARKER"
    good = tmp_path / "checkpoints" / "good.ckpt"
    good.parent.mkdir()
    torch.save({"global_step": 1, "state_dict": {}}, good)  # plain files (no sidecars): the newest is tried first
    os.utime(good, (1e9, 1e9))
    torch.save({"global_step": 99, "x": _Payload(marker)}, tmp_path / "checkpoints" / "newer.ckpt")
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "resume": "auto", "ckpt_path": None})
    assert resolve_resume(cfg) == str(good)
    assert not marker.exists()
    assert "newer.ckpt" in caplog.text and "unsafe" in caplog.text


def test_ckpt_cli_refuses_a_planted_pickle(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "MARKER"
    evil = _plant(tmp_path / "evil.ckpt", marker)
    assert cli_main(["ckpt", "inspect", str(evil)]) == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "refusing to load" in err

    folder = tmp_path / "sharded"
    _plant(folder / "meta.pt", marker, moe_plugin_layout={"shard_files": []})
    for argv in (["ckpt", "inspect", str(folder)], ["ckpt", "consolidate", str(folder), str(tmp_path / "out.ckpt")]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert str(folder / "meta.pt") in err and "refusing to load" in err
    # an evil expert shard behind an honest meta.pt
    honest = tmp_path / "honest"
    layout = {"format_version": 1, "expert_parallel_size": 1, "world_size": 1, "num_experts": {"l": 2}}
    layout.update(expert_params={"l.experts.w": 2}, shard_files=["experts-ep000-of-001.pt"])
    write_checkpoint_file({"global_step": 1, "state_dict": {}, "moe_plugin_layout": layout}, honest / "meta.pt")
    _plant(honest / "experts-ep000-of-001.pt", marker)
    assert cli_main(["ckpt", "consolidate", str(honest), str(tmp_path / "out.ckpt")]) == 2
    assert "experts-ep000-of-001.pt" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


def _dcp_folder(folder: Path) -> None:
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(
            {"model/w": torch.ones(2, 3), "model/b": torch.zeros(3, dtype=torch.bfloat16)},
            checkpoint_id=str(folder),
            no_dist=True,
        )


def test_format2_dense_metadata_is_read_without_running_code(tmp_path: Path, capsys) -> None:
    """The DCP folder of a format-2 checkpoint: torch reads its .metadata with a bare pickle.load."""
    import pickle

    import torch

    from moe_plugin.parallel.checkpoint_sharded import read_dense_full

    honest = tmp_path / "dcp"
    _dcp_folder(honest)
    full = read_dense_full(honest)  # a genuine folder still reads, bf16 included
    assert torch.equal(full["model/w"], torch.ones(2, 3)) and full["model/b"].dtype == torch.bfloat16

    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "v2"
    _dcp_folder(ckpt / "dense")
    (ckpt / "dense" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    layout = {"format_version": 2, "expert_parallel_size": 1, "world_size": 2, "num_experts": {}}
    layout.update(expert_params={}, shard_files=[], expert_files=[], dense_dcp="dense", data_parallel_shard_size=2)
    write_checkpoint_file({"global_step": 1, "state_dict": {}, "moe_plugin_layout": layout}, ckpt / "meta.pt")
    assert cli_main(["ckpt", "consolidate", str(ckpt), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted DCP metadata ran code"
    assert str(ckpt / "dense" / ".metadata") in err and "refusing to load" in err, err
    assert not (tmp_path / "out.ckpt").exists()
