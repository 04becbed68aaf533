from __future__ import annotations

import pytest

from moe_plugin.cli.compose import compose_config
from moe_plugin.config.validate import ConfigError
from moe_plugin.config.validate import validate_config as _validate
from moe_plugin.lightning.module import MoELanguageModule


def validate_config(cfg) -> None:
    _validate(cfg, optim_target=MoELanguageModule)  # as run() calls it


def _cfg(*overrides: str):
    return compose_config(list(overrides) + ["logger=none"])


def test_default_config_is_valid() -> None:
    validate_config(_cfg())


@pytest.mark.parametrize(
    "override,key",
    [
        ("+model.moe.num_expert=4", "model.moe.num_expert"),
        ("+model.hidden=4", "model.hidden"),
        ("model.moe.top_k=9", "model.moe.top_k"),
        ("model.num_kv_heads=3", "model.num_heads"),
        ("data.seq_len=4096", "data.seq_len"),
        ("+optim.learning_rate=1", "optim.learning_rate"),
        ("optim.lr=fast", "optim.lr"),
        ("+trainer.max_step=3", "trainer.max_step"),
        ("seed=abc", "seed"),
        ("model.moe.num_experts=1.5", "model.moe.num_experts"),
        ("data.source._target_=moe_plugin.data.sources.Nope", "data.source._target_"),
        ("model.head_dim=15", "model.head_dim=15"),
        ("model.head_dim=null model.hidden_size=60 model.num_heads=4", "model.hidden_size/model.num_heads=60/4=15"),
        ("optim.lr=-0.001", "optim.lr=-0.001"),
        ("optim.lr=0", "optim.lr=0"),
        ("optim.weight_decay=-1", "optim.weight_decay=-1"),
        ("optim.betas=[0.9,1.5]", "optim.betas"),
        ("optim.warmup_steps=-5", "optim.warmup_steps=-5"),
        ("trainer.precision=bf17", "trainer.precision='bf17'"),
        ("trainer.max_steps=-7", "trainer.max_steps=-7"),
        ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path=/nonexistent/last.ckpt"),
        ("resume=/nonexistent/run", "resume='/nonexistent/run'"),
        ("+foo=1", "foo is not a top-level config key"),
        ("+optimm.lr=1", "Did you mean optim?"),
    ],
)
def test_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(*override.split()))
    assert key in str(err.value)


def test_hidden_size_must_split_into_heads_without_head_dim() -> None:
    validate_config(_cfg("model.hidden_size=250"))  # explicit head_dim: any width works
    with pytest.raises(ConfigError, match=r"model\.hidden_size=250"):
        validate_config(_cfg("model.hidden_size=250", "model.head_dim=null"))


def test_missing_required_value_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"data\.source\.paths is required"):
        validate_config(_cfg("data=text_files"))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "32", "bf16", 32])
def test_valid_values_pass(precision) -> None:
    validate_config(_cfg(f"trainer.precision={precision}", "model.head_dim=16", "optim.lr=3e-4"))


def test_home_and_env_vars_expand_in_checkpoint_paths(tmp_path, monkeypatch) -> None:
    (tmp_path / "last.ckpt").write_bytes(b"x")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MY_RUNS", str(tmp_path))
    validate_config(_cfg('ckpt_path="~/last.ckpt"'))  # Hydra needs ~ quoted
    validate_config(_cfg("ckpt_path=$MY_RUNS/last.ckpt"))
