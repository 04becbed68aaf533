"""Byte-level windows of Python's own standard-library source: a corpus present on every machine."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset


class ByteWindows(Dataset):
    def __init__(self, data: torch.Tensor, seq_len: int, num_windows: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = data
        self.seq_len = seq_len
        self.starts = torch.randint(0, len(data) - seq_len - 1, (num_windows,), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(self.starts[i])
        return self.data[s : s + self.seq_len + 1]


class StdlibBytes(L.LightningDataModule):
    vocab_size = 256

    def __init__(
        self, seq_len: int = 64, batch_size: int = 8, train_windows: int = 2048, val_windows: int = 64
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.train_windows = train_windows
        self.val_windows = val_windows

    def setup(self, stage: str) -> None:
        text = Path(json.__file__).parent.joinpath("decoder.py").read_bytes()
        text += Path(json.__file__).parent.joinpath("encoder.py").read_bytes()
        data = torch.tensor(list(text), dtype=torch.long)
        split = int(0.9 * len(data))
        self.train = ByteWindows(data[:split], self.seq_len, self.train_windows, seed=0)
        self.val = ByteWindows(data[split:], self.seq_len, self.val_windows, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)
