from __future__ import annotations

import math

import pytest

from moe_plugin.lightning.schedules import lr_multiplier


def test_cosine_warmup_and_floor() -> None:
    f = lr_multiplier("cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_ling_recipe_hold_halve_anneal() -> None:
    f = lr_multiplier("ling", warmup_steps=20, total_steps=1000, min_lr_ratio=5e-5, halve_at=0.6, anneal_at=0.9)
    assert f(19) == pytest.approx(1.0)
    assert f(100) == 1.0 and f(599) == 1.0
    assert f(600) == 0.5 and f(899) == 0.5
    assert f(1000) == pytest.approx(5e-5)
    # inverse square root between the anneal start and the end
    k = (0.5 / 5e-5) ** 2 - 1
    assert f(950) == pytest.approx(0.5 / math.sqrt(1 + k * 0.5))
    values = [f(s) for s in range(900, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_bad_schedule_names_the_key() -> None:
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_multiplier("linear")
