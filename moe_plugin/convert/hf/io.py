"""Files of a Hugging Face model folder: config.json, safetensors weights (one file or shards + index).

Reading is lazy (`HFWeights.get` opens the shard that holds a key and reads that tensor only); writing
streams (`ShardWriter` keeps at most one shard's tensors in memory, then writes it), so a model larger than
memory converts one layer at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a Hugging Face tokenizer is saved as; copied along on export, detected on import.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


class HFFormatError(ValueError):
    """A Hugging Face folder or config we cannot convert; the message says what and what to do."""


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HFFormatError(
            f"{folder} has no config.json: pass the folder of a Hugging Face model (one written by save_pretrained "
            "or downloaded from the Hub beforehand); nothing is downloaded at run time."
        )
    return json.loads(path.read_text())


def write_config(folder: str | os.PathLike[str], config: dict[str, Any]) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def has_tokenizer(folder: str | os.PathLike[str]) -> bool:
    return any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def copy_tokenizer(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Copy the tokenizer files of folder `src` into `dst`; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


class HFWeights:
    """The tensors of a folder's safetensors files, read one at a time."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                bins = sorted(self.folder.glob("*.bin"))
                hint = (
                    " It holds PyTorch .bin weights: load it with transformers and save_pretrained(..., "
                    "safe_serialization=True) once, then convert."
                    if bins
                    else ""
                )
                raise HFFormatError(f"{folder} has no safetensors weights (model.safetensors or an index).{hint}")
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})  # noqa: SIM118 (safe_open has no __iter__)
        self.weight_map = weight_map
        self._handles: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise HFFormatError(
                f"{self.folder} has no tensor {key!r}: the weights do not match config.json (another architecture, "
                "or an incomplete download)."
            )
        name = self.weight_map[key]
        if name not in self._handles:
            self._handles[name] = self._safe_open(str(self.folder / name), framework="pt")
        return self._handles[name].get_tensor(key)


class ShardWriter:
    """Write tensors to model-XXXXX-of-YYYYY.safetensors shards of at most `max_shard_bytes`, plus the index.

    Tensors are buffered until the shard is full, then written; `close()` renames the shards once their number
    is known and writes model.safetensors.index.json (weight_map and total_size), as save_pretrained does.
    """

    def __init__(self, folder: str | os.PathLike[str], max_shard_bytes: int = 2 * 1024**3) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive.")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # contiguous, own storage: safetensors refuses views and shared storage
        self._buffer[name] = tensor.detach().to("cpu").contiguous().clone()
        self._buffer_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        save_file(self._buffer, str(self.folder / f"shard-{len(self._shards):05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Write the last shard and the index; returns the weight map."""
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
