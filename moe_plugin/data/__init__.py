"""Data: document sources, tokenizers and the language-modelling data module."""

from moe_plugin.data.datamodule import LMDataModule
from moe_plugin.data.sources import HFDiskDatasetSource, StdlibSource, TextFilesSource
from moe_plugin.data.tokenizers import ByteTokenizer, HFTokenizer

__all__ = ["ByteTokenizer", "HFDiskDatasetSource", "HFTokenizer", "LMDataModule", "StdlibSource", "TextFilesSource"]
