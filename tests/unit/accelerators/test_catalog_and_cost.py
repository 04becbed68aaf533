"""Hardware catalog and the cost formulas (docs/cost.md)."""

from __future__ import annotations

import pytest

from moe_plugin.accelerators.catalog import convert, get_device, load_catalog, match_device, spec_from_mapping
from moe_plugin.accelerators.cost import estimate_cost, mfu_from_throughput, rank_devices

# The Ling report's Table 1.
PAPER = {
    "device_a": (370, 64, 7.0, False),
    "device_b": (120, 96, 4.5, False),
    "device_c": (312, 80, 10.0, False),
    "device_d": (989, 80, 27.5, True),
    "device_e": (147, 96, 5.64, True),
}


def test_paper_devices_carry_table_1() -> None:
    catalog = load_catalog()
    for name, (tflops, mem, price, fp8) in PAPER.items():
        s = catalog[name]
        assert (s.peak_tflops_bf16, s.memory_gb, s.price_per_hour, s.fp8, s.currency) == (
            tflops,
            mem,
            price,
            fp8,
            "RMB",
        )


def test_named_devices_have_public_specs() -> None:
    catalog = load_catalog()
    for name in ("h100", "h800", "h20", "a100", "mi300x", "mi250x", "ascend_910b", "gaudi2"):
        s = catalog[name]
        assert s.peak_tflops_bf16 and s.memory_gb and s.memory_bandwidth_tbs and s.price_per_hour > 0, name
    assert catalog["h100"].peak_tflops_bf16 == 989 and catalog["a100"].peak_tflops_bf16 == 312


def test_device_names_match_catalog_entries() -> None:
    assert match_device("NVIDIA H100 80GB HBM3").name == "h100"
    assert match_device("NVIDIA A100-SXM4-80GB").name == "a100"
    assert match_device("NVIDIA H20").name == "h20"
    assert match_device("NVIDIA H200") is None  # not the H20
    assert match_device("AMD Instinct MI300X").name == "mi300x"
    assert match_device("Ascend910B2").name == "ascend_910b"


def test_overrides_and_bad_keys() -> None:
    assert get_device("h100", {"price_per_hour": 2.0, "currency": "EUR"}).price_per_hour == 2.0
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['prise'\\]"):
        get_device("h100", {"prise": 2.0})
    with pytest.raises(ValueError, match="hardware='h1000' is not in the catalog"):
        get_device("h1000")
    with pytest.raises(ValueError, match="peak_tflops_bf16=0"):
        spec_from_mapping({"name": "x", "peak_tflops_bf16": 0})
    with pytest.raises(ValueError, match="rate.GBP"):
        convert(1.0, "GBP", "USD")
    assert convert(100.0, "RMB", "USD") == pytest.approx(14.0)
    assert convert(14.0, "USD", "RMB", rates={"RMB": 0.2}) == pytest.approx(70.0)


def test_paper_cost_reproduced_with_the_reports_activated_params() -> None:
    """6 x 28.8e9 FLOPs per token, 1e12 tokens, device D at 21% MFU: about 6.35M RMB."""
    est = estimate_cost(get_device("device_d"), 6 * 28.8e9, 1e12, mfu=0.21)
    assert est.cost == pytest.approx(6.35e6, rel=0.005)
    assert est.device_hours == pytest.approx(6 * 28.8e9 * 1e12 / (0.21 * 989e12) / 3600)
    assert est.cost_per_million_tokens == pytest.approx(est.cost / 1e6)
    # 20% cheaper on the lower-spec system (5.08M RMB) means device A ran at about 17.9% MFU.
    implied = 6 * 28.8e9 * 1e12 / (5.08e6 / 7.0 * 3600) / 370e12
    assert implied == pytest.approx(0.179, abs=0.001)
    assert estimate_cost(get_device("device_a"), 6 * 28.8e9, 1e12, mfu=implied).cost == pytest.approx(5.08e6)


def test_measured_mode_is_the_inverse_of_assumed_mfu() -> None:
    spec = get_device("h100")
    assumed = estimate_cost(spec, 1e9, 1e10, mfu=0.4)
    measured = estimate_cost(spec, 1e9, 1e10, tokens_per_s_per_device=assumed.tokens_per_s_per_device)
    assert measured.mode == "measured" and measured.mfu == pytest.approx(0.4)
    assert measured.cost == pytest.approx(assumed.cost)
    assert mfu_from_throughput(assumed.tokens_per_s_per_device, 1e9, 989e12) == pytest.approx(0.4)


def test_ranking_converts_currency_and_sorts() -> None:
    catalog = load_catalog()
    specs = [catalog[n] for n in ("device_d", "device_a", "h100")]
    ranked = rank_devices(specs, 1e11, 1e12, 0.3, "USD", measured={"h100": 5000.0})
    assert [e.cost for e in ranked] == sorted(e.cost for e in ranked)
    by = {e.device: e for e in ranked}
    assert by["device_d"].price_per_hour == pytest.approx(27.5 * 0.14)
    assert by["h100"].mode == "measured" and by["h100"].tokens_per_s_per_device == 5000.0


def test_bad_cost_inputs_name_the_argument() -> None:
    spec = get_device("h100")
    with pytest.raises(ValueError, match="mfu=21"):
        estimate_cost(spec, 1e9, 1e12, mfu=21)
    with pytest.raises(ValueError, match="exactly one of mfu"):
        estimate_cost(spec, 1e9, 1e12)
    with pytest.raises(ValueError, match="tokens=0"):
        estimate_cost(spec, 1e9, 0, mfu=0.2)


def test_hardware_group_is_validated_before_anything_is_built() -> None:
    from moe_plugin.cli.compose import compose_config
    from moe_plugin.config.validate import ConfigError, validate_config

    validate_config(compose_config(["hardware=h100", "hardware.price_per_hour=2.2"]))
    with pytest.raises(ConfigError, match="unknown key\\(s\\) \\['prise'\\]"):
        validate_config(compose_config(["hardware=h100", "+hardware.prise=2.2"]))
    with pytest.raises(ConfigError, match="hardware.price_per_hour=-1"):
        validate_config(compose_config(["hardware=auto", "+hardware.price_per_hour=-1"]))
