"""Tokenizers: byte-level by default (vocab 256, nothing to download), or a local Hugging Face tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    vocab_size = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (never from the hub)."""

    def __init__(self, path: str) -> None:
        if not Path(path).expanduser().is_dir():
            raise FileNotFoundError(
                f"data.tokenizer.path={path!r} is not a folder. Point it at a local tokenizer folder "
                "(one written by tokenizer.save_pretrained); nothing is downloaded at run time."
            )
        from transformers import AutoTokenizer  # optional dependency

        self._tok = AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True)
        self.vocab_size = len(self._tok)

    def encode(self, data: bytes) -> np.ndarray:
        ids = self._tok(data.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        eos = [self._tok.eos_token_id] if self._tok.eos_token_id is not None else []
        return np.asarray(ids + eos, dtype=np.int32)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids])
