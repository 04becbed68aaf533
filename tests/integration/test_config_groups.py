"""Every option of every config group composes, validates and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moe_plugin.accelerators import detected
from moe_plugin.cli.compose import compose_config
from moe_plugin.config.validate import ConfigError, validate_config
from moe_plugin.lightning.trainer import instantiate_list, resolve_accelerator, resolve_strategy

CONF = Path(__file__).resolve().parents[2] / "moe_plugin" / "conf"
REQUIRED = {
    "data/text_files": ["data.source.paths=[{tmp}]"],
    "data/hf_dataset": ["data.source.path={tmp}"],
}

# options that read a local Hugging Face folder (tested with a real one in tests/integration/test_from_hf.py)
NEEDS_A_FOLDER = {("model", "from_hf"), ("model", "from_hf_upcycle")}
# options that interpolate ${hydra:launcher...}: they resolve only inside a Hydra launch
LAUNCHED_ONLY = {
    ("experiment", "slurm_expert_parallel"): "resolves ${hydra:launcher} only when launched: "
    "tests/integration/test_launchers.py runs it through submitit's local executor",
}


def _options() -> list[tuple[str, str]]:
    out = []
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_")):
        # moefy: composed from users' own trees, not train.yaml (tests/integration/test_existing_project.py)
        if group.name in ("hydra", "moefy"):
            continue
        for f in sorted(group.glob("*.yaml")):
            out.append((group.name, f.stem))
    return out


@pytest.mark.parametrize("group,option", _options(), ids=lambda v: v)
def test_option_composes_validates_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    extra = [o.format(tmp=tmp_path) for o in REQUIRED.get(f"{group}/{option}", [])]
    overrides = [f"{group}={option}", *extra, f"paths.output_dir={tmp_path}"]
    if group == "hparams_search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    if (group, option) in LAUNCHED_ONLY:
        pytest.skip(LAUNCHED_ONLY[(group, option)])
    cfg = compose_config(overrides)
    if (group, option) in NEEDS_A_FOLDER:
        # without the folder it names, the option fails validation naming the key to set
        with pytest.raises(ConfigError, match="model.path"):
            validate_config(cfg)
        return
    if group == "accelerator" and option != "auto" and option not in detected().present:
        # A vendor that is not on this machine fails validation, naming what was detected.
        with pytest.raises(ConfigError, match="Detected: cpu"):
            validate_config(cfg)
        return
    validate_config(cfg)
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="partial")
    assert sum(p.numel() for p in model.parameters()) > 0
    if group == "data" and option == "stdlib":
        instantiate(cfg.data, _convert_="partial")
    if group in ("callbacks", "logger"):
        instantiate_list(cfg[group])
    resolve_accelerator(cfg)
    if group == "strategy":
        resolve_strategy(cfg)


def test_groups_compose_from_another_projects_tree(tmp_path: Path) -> None:
    """A user's own Hydra tree picks our groups up through hydra.searchpath pkg://moe_plugin.conf."""
    (tmp_path / "my_config.yaml").write_text(
        "defaults:\n  - model: ling_tiny\n  - optim: adamw\n  - _self_\n"
        "hydra:\n  searchpath:\n    - pkg://moe_plugin.conf\n"
        "my_setting: 3\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose(config_name="my_config", overrides=["model.moe.num_experts=4"])
    assert cfg.my_setting == 3 and cfg.model.moe.num_experts == 4 and cfg.optim.lr > 0
    model = instantiate(cfg.model, _convert_="partial")
    assert model.layers[0].ffn.num_experts == 4
