"""The docs' commands run as written.

A fenced ```bash block in README.md or docs/*.md whose previous line is the marker `<!-- runnable -->` is run
by this test exactly as written (no overrides added: a block must be cheap by itself), with bash -e, in a fresh
temporary folder that holds links to the checkout's files (train.py, moe_plugin/, conf/, bench/, ...), HOME set
to that folder, and `moe-plugin` being this checkout's CLI. Every command must exit 0 within the timeout.

Mark only blocks that take seconds (tiny configs, `moe-plugin inspect/plan/cost/ckpt`): the whole test stays
around two minutes on a 2-core CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- runnable -->"
BLOCK_TIMEOUT = 240  # seconds, per block
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def runnable_blocks(root: Path = ROOT) -> list[tuple[str, str]]:
    """[(file:line, script)] of every marked block, in file order."""
    found = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        for m in _FENCE.finditer(text):
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
            if before != MARKER:
                continue
            line = text[: m.start()].count("\n") + 1
            where = f"{doc.relative_to(root)}:{line}"
            if m.group(1) not in ("bash", "sh"):
                raise AssertionError(f"{where}: {MARKER} marks a ```{m.group(1)} block; only bash blocks run")
            found.append((where, m.group(2)))
    return found


def _workspace(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder that looks like the checkout (links) plus an environment whose `moe-plugin` is this checkout's."""
    work = tmp_path / "work"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in ("outputs", "multirun"):
            continue
        (work / entry.name).symlink_to(entry)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "moe-plugin"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m moe_plugin "$@"\n')
    shim.chmod(0o755)
    python = bin_dir / "python"  # `python` in a block is the interpreter running the tests
    python.symlink_to(sys.executable)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HOME": str(work),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
    }
    return work, env


def test_the_marker_finds_blocks() -> None:
    blocks = runnable_blocks()
    assert len(blocks) >= 6, blocks  # the marker scheme has not silently stopped matching
    files = {where.split(":")[0] for where, _ in blocks}
    assert {"docs/quickstart.md", "docs/data.md"} <= files


def test_marker_parsing(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(f"{MARKER}\n```bash\necho a\n```\n\n```bash\necho skipped\n```\n")
    (tmp_path / "docs" / "x.md").write_text(f"text\n\n{MARKER}\n```bash\necho b\n```\n")
    assert runnable_blocks(tmp_path) == [("README.md:2", "echo a\n"), ("docs/x.md:4", "echo b\n")]
    (tmp_path / "docs" / "y.md").write_text(f"{MARKER}\n```python\nprint(1)\n```\n")
    with pytest.raises(AssertionError, match="only bash blocks run"):
        runnable_blocks(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("where", "script"), runnable_blocks(), ids=[w for w, _ in runnable_blocks()])
def test_runnable_block(where: str, script: str, tmp_path: Path) -> None:
    work, env = _workspace(tmp_path)
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{where} failed (exit {proc.returncode}) after {time.monotonic() - start:.0f} s:\n{script}\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
