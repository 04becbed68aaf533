"""Decoder language models built from moe_plugin.layers."""

from moe_plugin.models.decoder import DecoderBlock, MoEDecoderLM

__all__ = ["DecoderBlock", "MoEDecoderLM"]
