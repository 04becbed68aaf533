"""examples/existing_project: an ordinary dense Lightning project made MoE with moe_plugin.

Runs the example's own train.py in a subprocess (Hydra owns the process), as its README says to.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moe_plugin import MoE

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "existing_project"


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(EXAMPLE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _train(run_dir: Path, *overrides: str, launcher: list[str] | None = None, timeout: float = 240) -> dict:
    cmd = [*(launcher or [sys.executable]), str(EXAMPLE / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=EXAMPLE, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads((run_dir / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dense_run_then_upcycled_moe_run_starts_at_the_dense_loss(tmp_path: Path) -> None:
    short = ["trainer.max_steps=16", "trainer.val_check_interval=8"]
    dense = _train(tmp_path / "dense", "moefy=none", *short)
    assert dense["val_loss"] < dense["first_val_loss"] - 0.5  # the dense project learns

    moe = _train(tmp_path / "moe", f"init_from='{dense['checkpoint']}'", *short)
    # Upcycled from the dense checkpoint: the MoE model's first validation is the dense model's last one.
    diff = abs(moe["first_val_loss"] - dense["val_loss"])
    print(
        f"dense val loss {dense['val_loss']:.7f}, upcycled MoE before training {moe['first_val_loss']:.7f}, diff {diff:.2g}"
    )
    assert moe["first_val_loss"] == pytest.approx(dense["val_loss"], abs=1e-5)
    assert moe["params"] > dense["params"]
    assert moe["val_loss"] < moe["first_val_loss"]  # and it keeps training


def _has_expert_parallel() -> bool:
    """moe_plugin.parallel exposes apply_expert_parallel (in the package or its `apply` module)."""
    for name in ("moe_plugin.parallel", "moe_plugin.parallel.apply"):
        try:
            if hasattr(importlib.import_module(name), "apply_expert_parallel"):
                return True
        except ImportError:
            continue
    return False


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    not _has_expert_parallel(),
    reason="moe_plugin.parallel has no apply_expert_parallel yet: the expert_parallel strategy has not landed",
)
def test_example_trains_with_expert_parallelism_on_two_processes(tmp_path: Path) -> None:
    result = _train(
        tmp_path / "ep",
        "strategy=expert_parallel",
        "strategy.expert_parallel_size=2",
        "trainer.devices=2",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"],
    )
    assert result["val_loss"] < result["first_val_loss"]
    # Rank 0 holds half of every layer's experts: its parameter count is the full model's minus half the experts.
    sys.path.insert(0, str(EXAMPLE))
    try:
        cfg = _compose()
        model = instantiate(cfg.moefy)(instantiate(cfg.model, vocab_size=256))
    finally:
        sys.path.remove(str(EXAMPLE))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters())
    assert result["params"] == total - experts // 2


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(EXAMPLE / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    "option, experts, top_k",
    [("none", 0, 0), ("random", 4, 2), ("upcycle", 4, 2), ("upcycle_fine_grained", 16, 4)],
)
def test_the_projects_own_hydra_tree_composes_the_moefy_group(
    option: str, experts: int, top_k: int, monkeypatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    overrides = [f"moefy={option}"] + (["moefy.num_experts=16", "moefy.top_k=4"] if experts == 16 else [])
    cfg = _compose(*overrides)
    assert cfg.model._target_ == "my_project.model.GPT"  # the user's own model config, untouched
    torch.manual_seed(0)
    model = instantiate(cfg.model, vocab_size=256).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        dense = model(ids)
    model = instantiate(cfg.moefy)(model)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == (0 if option == "none" else 2)
    if moes:
        assert (moes[0].num_experts, moes[0].top_k) == (experts, top_k)
    if option.startswith("upcycle"):
        with torch.no_grad():
            torch.testing.assert_close(model(ids), dense, rtol=0, atol=1e-5)


def test_readme_diff_is_the_code() -> None:
    """Every line the README's diff adds is in the example's files: the README shows what was done."""
    readme = (EXAMPLE / "README.md").read_text()
    diff = re.search(r"```diff\n(.*?)```", readme, re.S)
    assert diff, "README.md must show the change as a ```diff block"
    sources = "\n".join(p.read_text() for p in EXAMPLE.rglob("*") if p.suffix in (".py", ".yaml"))
    added = [ln[1:].strip() for ln in diff.group(1).splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert len(added) >= 3
    for line in added:
        if line:
            assert line in sources, f"README diff line not in the example: {line!r}"
