"""Language-modelling data module: documents -> tokens -> fixed-length windows.

Documents are split into train and validation by a hash of their name (deterministic, independent of
file order and of how many processes read them). Each split's tokens are concatenated and cut into
non-overlapping windows of seq_len + 1 tokens; a sample is (input_ids[:-1], labels[1:]) as one tensor.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moe_plugin.data.sampler import GlobalOrderSampler
from moe_plugin.data.tokenizers import ByteTokenizer
from moe_plugin.errors import ConfigError

# Lightning warns on mid-epoch resume unless the DataLoader itself has state_dict(); our position lives in
# this data module's state_dict() and GlobalOrderSampler, which do resume exactly.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


class TokenWindows(Dataset):
    """Non-overlapping windows of `seq_len + 1` tokens over one token stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


def is_validation(name: str, val_fraction: float) -> bool:
    digest = hashlib.md5(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


class LMDataModule(pl.LightningDataModule):
    def __init__(
        self,
        source: Iterable[tuple[str, bytes]],
        tokenizer: Any | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 1234,
        test_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len} must be positive.")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be positive.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must be strictly between 0 and 1, e.g. 0.05.")
        if not 0.0 <= test_fraction < 1.0 - val_fraction:
            raise ValueError(
                f"data.test_fraction={test_fraction} must be >= 0 and leave documents for training "
                f"(val_fraction + test_fraction < 1), e.g. 0.05."
            )
        self.test_fraction = test_fraction
        self.test_set: TokenWindows | None = None
        self.source = source
        self.tokenizer = tokenizer or ByteTokenizer()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self._resume: dict[str, int] = {}  # {"epoch", "samples"} restored from a checkpoint
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None
        self.stats: dict[str, int] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_corpus()

    def prepare_corpus(self) -> None:
        """Read, tokenize and split the corpus (once). run() calls it before building the model, so that a
        corpus that cannot train (empty, too small) is reported as a ConfigError in seconds."""
        if self.train_set is not None:
            return
        train_parts: list[np.ndarray] = []
        val_parts: list[np.ndarray] = []
        test_parts: list[np.ndarray] = []
        train_bytes: list[int] = []  # UTF-8 bytes of each training document (bits per byte of a held-out one)
        test_nbytes: list[int] = []
        n_docs = val_bytes = 0
        for name, data in self.source:
            ids = self.tokenizer.encode(data)
            if is_validation(name, self.val_fraction):
                val_parts.append(ids)
                val_bytes += len(data)
            elif self.test_fraction and is_validation(name, self.val_fraction + self.test_fraction):
                # the next slice of the same hash range: documents in neither train nor validation
                test_parts.append(ids)
                test_nbytes.append(len(data))
            else:
                train_parts.append(ids)
                train_bytes.append(len(data))
            n_docs += 1
        source_name = type(self.source).__name__
        if n_docs == 0:
            raise ConfigError(
                f"The corpus from {source_name} is empty: no non-empty document was found. Check data.source "
                "(paths, pattern) or pick another data= option."
            )
        if not train_parts and test_parts:  # tiny corpora: training comes before a test split
            train_parts, train_bytes, test_parts, test_nbytes = test_parts, test_nbytes, [], []
        if not val_parts:  # tiny corpora: hold out the last document
            val_parts.append(train_parts.pop())
            val_bytes += train_bytes.pop()
        if not train_parts:
            raise ConfigError(
                f"The corpus from {source_name} has {n_docs} document(s), all held out for validation. "
                "Add documents or lower data.val_fraction."
            )
        train_tokens, val_tokens = np.concatenate(train_parts), np.concatenate(val_parts)
        for split, toks in (("train", train_tokens), ("validation", val_tokens)):
            if len(toks) < self.seq_len + 1:
                raise ConfigError(
                    f"The {split} split has {len(toks)} tokens, fewer than data.seq_len + 1 = {self.seq_len + 1}. "
                    "Add text or lower data.seq_len."
                )
        self.train_set = TokenWindows(train_tokens, self.seq_len)
        self.val_set = TokenWindows(val_tokens, self.seq_len)
        self.stats = {
            "documents": n_docs,
            "train_tokens": int(len(train_tokens)),
            "val_tokens": int(len(val_tokens)),
            "val_bytes": int(val_bytes),
        }
        test_tokens = np.concatenate(test_parts) if test_parts else np.zeros(0, dtype=np.int32)
        if len(test_tokens) >= self.seq_len + 1:
            self.test_set = TokenWindows(test_tokens, self.seq_len)
            # bytes per token of the test split, for bits per byte (1 for the byte tokenizer)
            self.stats.update(test_tokens=int(len(test_tokens)), test_bytes=int(sum(test_nbytes)))

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        rank, world = self._rank_world()
        sampler = GlobalOrderSampler(len(self.train_set), self.batch_size, rank, world, seed=self.seed, shuffle=True)
        if self._resume:
            sampler.epoch = self._resume["epoch"]
            sampler.start_sample = self._resume["samples"]
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def _eval_rank_world(self) -> tuple[int, int]:
        """(rank, ranks) splitting evaluation data: a strategy may use fewer ranks (local_sgd: each island
        evaluates the whole set), else every rank."""
        trainer = getattr(self, "trainer", None)
        return getattr(getattr(trainer, "strategy", None), "evaluation_rank_world", None) or self._rank_world()

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        rank, world = self._eval_rank_world()
        sampler = GlobalOrderSampler(len(self.val_set), self.batch_size, rank, world, shuffle=False, drop_last=False)
        return DataLoader(self.val_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The held-out test split (data.test_fraction > 0), else the validation split (say so in the results)."""
        assert self.val_set is not None, "call setup() first"
        split = self.test_set if self.test_set is not None else self.val_set
        rank, world = self._eval_rank_world()
        sampler = GlobalOrderSampler(len(split), self.batch_size, rank, world, shuffle=False, drop_last=False)
        return DataLoader(split, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def state_dict(self) -> dict[str, int]:
        """Data position: the epoch and the global samples consumed in it (world-size independent)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return dict(self._resume)
        _, world = self._rank_world()
        # `processed`, not `completed`: ModelCheckpoint(every_n_train_steps) saves in on_train_batch_end, after
        # the batch was trained on but before Lightning counts it completed (at validation end both are equal).
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "samples": batches * self.batch_size * world}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = {"epoch": int(state_dict["epoch"]), "samples": int(state_dict["samples"])}
