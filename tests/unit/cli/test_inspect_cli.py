"""`moe-plugin inspect` reports FLOPs per token at the configured sequence length (data.seq_len), and at the
model's maximum beside it."""

from __future__ import annotations

from moe_plugin.cli.inspect import inspect_model


def test_flops_at_configured_and_max_seq_len():
    info = inspect_model(["model=ling_tiny"], configured=True)
    assert info["seq_len"] == 256 and info["max_seq_len"] == 2048  # data.seq_len of the default data group
    attn_256 = info["attention_flops_per_token"]
    assert info["flops_per_token"] == info["flops_per_token_no_attention"] + attn_256
    # 6 * activated non-embedding params + 12 * layers * heads * head_dim * seq_len
    assert attn_256 == 12 * 4 * 4 * 64 * 256
    assert info["flops_per_token_at_max_seq_len"] == info["flops_per_token_no_attention"] + 8 * attn_256
    longer = inspect_model(["model=ling_tiny", "data.seq_len=512"], configured=True)
    assert longer["seq_len"] == 512 and longer["attention_flops_per_token"] == 2 * attn_256
    explicit = inspect_model(["model=ling_tiny"], seq_len=128)
    assert explicit["attention_flops_per_token"] * 2 == attn_256
    assert inspect_model(["model=ling_tiny"])["seq_len"] == 2048  # `moe-plugin cost` sizes for the maximum


def test_cli_prints_both_lengths(capsys):
    from moe_plugin.cli.main import main

    assert main(["inspect", "model=ling_tiny"]) == 0
    out = capsys.readouterr().out
    assert "at seq_len 256" in out and "max_seq_len 2048" in out
