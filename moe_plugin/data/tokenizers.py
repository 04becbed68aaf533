"""Tokenizers: byte-level by default (vocab 256, nothing to download), or a local Hugging Face tokenizer."""

from __future__ import annotations

import numpy as np

from moe_plugin.data.sources import expand_path


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    vocab_size = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """Bytes back to text. A model whose vocabulary is larger than 256 (`model.vocab_size=512` with this
        tokenizer) can sample ids that are no byte: each decodes to U+FFFD, like an invalid byte sequence."""
        out = bytearray()
        text: list[str] = []
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
                continue
            text.append(out.decode("utf-8", errors="replace") + "\ufffd")
            out.clear()
        return "".join(text) + out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (never from the hub)."""

    def __init__(self, path: str) -> None:
        if not expand_path(path).is_dir():
            raise FileNotFoundError(
                f"data.tokenizer.path={path!r} is not a folder. Point it at a local tokenizer folder "
                "(one written by tokenizer.save_pretrained); nothing is downloaded at run time."
            )
        from transformers import AutoTokenizer  # optional dependency

        self._tok = AutoTokenizer.from_pretrained(str(expand_path(path)), local_files_only=True)
        self.vocab_size = len(self._tok)

    def encode(self, data: bytes) -> np.ndarray:
        ids = self._tok(data.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        eos = [self._tok.eos_token_id] if self._tok.eos_token_id is not None else []
        return np.asarray(ids + eos, dtype=np.int32)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids])
