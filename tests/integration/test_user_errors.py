"""Every user error of `python train.py` and `moe-plugin`: one line naming the key or file, exit status 2, no
traceback, and nothing left behind (no run folder: it appears only once the run starts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["experiment=tiny_smoke", "logger=csv", "model.num_layers=1", "trainer.max_steps=2"]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    for w in words:
        assert w in last, (w, last)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_py_user_errors_are_one_line_and_leave_no_run_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty_corpus"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    binary = empty / "mixed"
    binary.mkdir()
    (binary / "a.bin").write_bytes(bytes(range(256)) * 8)
    (binary / "b.bin").write_bytes(bytes(range(256)) * 8)
    (binary / "c.txt").write_text("some text " * 500)
    # the rest of the rules are checked in-process in tests/unit/config/test_validate.py
    cases = {
        "odd head_dim": (["model.head_dim=15"], ["model.head_dim=15", "even"]),
        "missing ckpt_path": ([f"ckpt_path={tmp_path}/nope.ckpt"], ["ckpt_path=", "does not exist"]),
        "unknown top-level key": (["+lr=1e-3"], ["lr is not a top-level config key"]),
        "empty corpus (found before the model is built)": (
            ["data=text_files", f"data.source.paths=[{empty}]"],
            ["empty"],
        ),
        "a constructor's refusal": (["data.batch_size=0"], ["data.batch_size=0"]),
        # Hydra's own override errors (it prints several lines and exits 1): checked before @hydra.main
        "unknown option": (["model=nope"], ["model=nope", "ling_tiny"]),
        "misspelt key": (["trainer.max_stepz=3"], ["trainer.max_stepz", "+trainer.max_stepz=3"]),
        "malformed override": (["optim.lr=1e-3=2"], ["'optim.lr=1e-3=2' is not a valid override"]),
        "unquoted ~": (["data=text_files", "data.source.paths=[~/x]"], ["data.source.paths=[~/x]", '"~/books"']),
        "mostly binary corpus": (["data=text_files", f"data.source.paths=[{binary}]"], ["2 of 3 files are binary"]),
    }
    for name, (overrides, words) in cases.items():
        proc = _run(tmp_path, str(ROOT / "train.py"), *TINY, *overrides)
        _one_line_error(proc, *words)
        leftovers = [p for p in tmp_path.iterdir() if p.name != "empty_corpus"]
        assert leftovers == [], f"{name}: a failed start left {leftovers}"


def test_cli_user_errors(tmp_path: Path, capsys) -> None:
    from moe_plugin.cli.main import main

    def err(argv: list[str], *words: str) -> None:
        assert main(argv) == 2, argv
        text = capsys.readouterr().err.strip()
        assert len(text.splitlines()) == 1 and all(w in text for w in words), text

    err(["inspect", "model=nope"], "model=nope", "ling_lite")
    err(["cost", "model=ling_tiny", "mfu=abc"], "mfu='abc'", "not a number")
    err(["cost", "model=ling_tiny", "hardware=h100", "tokens=lots"], "tokens='lots'")
    empty, truncated = tmp_path / "empty.ckpt", tmp_path / "cut.ckpt"
    empty.write_bytes(b"")
    import torch

    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:700])
    for path in (empty, truncated):  # what inspect exists to diagnose: a report, not a crash
        assert main(["ckpt", "inspect", str(path)]) == 1
        out = capsys.readouterr().out
        assert "valid           False" in out and str(path) in out
    truncated_json, wrong_format = tmp_path / "cand.json", tmp_path / "ref.json"
    truncated_json.write_text('{"format": ')
    wrong_format.write_text("{}")
    err(["align", "compare", str(truncated_json), str(truncated_json)], str(truncated_json), "not a JSON record")
    err(["align", "compare", str(wrong_format), str(truncated_json)], str(wrong_format), "record format")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_single_file_corpus_trains_and_a_changed_corpus_stops_resume(tmp_path: Path) -> None:
    """`data.source.paths=[book.txt]` trains (split by position); resuming after the book changed stops with one
    line naming data.allow_changed, which then lets it continue."""
    import random

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial kings".split()
    rng = random.Random(0)
    book = tmp_path / "book.txt"
    book.write_text(" ".join(rng.choice(words) for _ in range(8000)))
    args = [str(ROOT / "train.py"), *TINY, "data=text_files", "data.source.paths=[book.txt]", "hydra.run.dir=run"]
    args += ["sample_lines=0", "validate_at_end=false"]
    first = _run(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step000002.ckpt").exists()
    book.write_text(book.read_text().replace("fox", "cat"))
    changed = _run(tmp_path, *args, "trainer.max_steps=4")
    _one_line_error(changed, "corpus differs", "data.allow_changed=true")
    allowed = _run(tmp_path, *args, "trainer.max_steps=4", "data.allow_changed=true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "resuming on a changed corpus" in allowed.stderr + allowed.stdout
    assert (tmp_path / "run" / "checkpoints" / "step000004.ckpt").exists()
