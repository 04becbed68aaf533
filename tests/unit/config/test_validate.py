from __future__ import annotations

import pytest

from moe_plugin.cli.compose import compose_config
from moe_plugin.config.validate import ConfigError, validate_config


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
    ],
)
def test_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(override))
    assert key in str(err.value)


def test_hidden_size_must_split_into_heads_without_head_dim() -> None:
    validate_config(_cfg("model.hidden_size=250"))  # explicit head_dim: any width works
    with pytest.raises(ConfigError, match=r"model\.hidden_size=250"):
        validate_config(_cfg("model.hidden_size=250", "model.head_dim=null"))


def test_missing_required_value_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"data\.source\.paths is required"):
        validate_config(_cfg("data=text_files"))
