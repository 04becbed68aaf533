"""Language-modelling data module: documents -> tokens -> fixed-length windows.

Splits (train, validation, optional test), chosen once per corpus and the same on every rank and machine:

- by document, when the corpus has enough documents: a document is held out when a hash of its name falls
  below `val_fraction` (test: the next `test_fraction` of the hash range), independent of file order;
- by position inside each document otherwise (a single book, a handful of files): document d of n_d tokens
  gives train d[: n_d (1 - v - t)], validation the next n_d v tokens, test the last n_d t.

"Enough documents" means the document split gives train and validation at least one window each, and does not
hold out more than 3x the requested fraction of the tokens (a few large documents would). Each split's tokens
are concatenated and cut into non-overlapping windows of seq_len + 1 tokens; a sample is one such window
(inputs window[:-1], labels window[1:]).

The data module's checkpoint state holds the data position and a fingerprint of the corpus (documents, bytes,
hashes of each split's tokens); resuming on a different corpus stops with a ConfigError unless
`data.allow_changed=true`.
"""

from __future__ import annotations

import hashlib
import logging
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

log = logging.getLogger(__name__)

# Lightning warns on mid-epoch resume unless the DataLoader itself has state_dict(); our position lives in
# this data module's state_dict() and GlobalOrderSampler, which do resume exactly.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")

# The document split may hold out at most this multiple of the requested fraction of the tokens.
MAX_HELD_OUT_RATIO = 3.0


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
        allow_changed: bool = False,
        val_sequences: int | None = None,
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
        if val_sequences is not None and val_sequences < 1:
            raise ValueError(
                f"data.val_sequences={val_sequences} must be a positive number of sequences (e.g. 256), or null to "
                "validate on the whole validation split."
            )
        # validation reads the first val_sequences windows of the split, whatever the batch size and rank count
        self.val_sequences = val_sequences
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
        self.allow_changed = allow_changed  # resume on a corpus that differs from the checkpoint's
        self.fingerprint: dict[str, Any] = {}
        self._saved_fingerprint: dict[str, Any] | None = None

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
        docs: list[tuple[str, np.ndarray, int]] = []  # (name, token ids, UTF-8 bytes)
        for name, data in self.source:
            docs.append((name, self.tokenizer.encode(data), len(data)))
        source_name = type(self.source).__name__
        if not docs:
            raise ConfigError(
                f"The corpus from {source_name} is empty: no non-empty document was found. Check data.source "
                "(paths, pattern) or pick another data= option."
            )
        splits = self._split_by_documents(docs)
        mode = "documents"
        if splits is None:
            splits, mode = self._split_by_position(docs), "positions"
        tokens = {k: np.concatenate(parts) if parts else np.zeros(0, np.int32) for k, (parts, _) in splits.items()}
        for split in ("train", "validation"):
            if len(tokens[split]) < self.seq_len + 1:
                raise ConfigError(
                    f"The {split} split has {len(tokens[split])} tokens, fewer than data.seq_len + 1 = "
                    f"{self.seq_len + 1} (the corpus has {sum(len(d[1]) for d in docs)} tokens in {len(docs)} "
                    "document(s)). Add text or lower data.seq_len."
                )
        self.train_set = TokenWindows(tokens["train"], self.seq_len)
        self.val_set = TokenWindows(tokens["validation"], self.seq_len)
        self.stats = {
            "documents": len(docs),
            "train_tokens": int(len(tokens["train"])),
            "val_tokens": int(len(tokens["validation"])),
            "val_bytes": int(splits["validation"][1]),
        }
        if self.test_fraction and len(tokens["test"]) >= self.seq_len + 1:
            self.test_set = TokenWindows(tokens["test"], self.seq_len)
            # bytes per token of the test split, for bits per byte (1 for the byte tokenizer)
            self.stats.update(test_tokens=int(len(tokens["test"])), test_bytes=int(splits["test"][1]))
        self.fingerprint = corpus_fingerprint(docs, tokens, mode, self.seq_len)
        log.info(
            "data: %d documents split by %s: %d train / %d validation tokens",
            len(docs),
            mode,
            self.stats["train_tokens"],
            self.stats["val_tokens"],
        )
        if self._saved_fingerprint is not None:
            self._check_fingerprint(self._saved_fingerprint)

    def _split_by_documents(self, docs: list[tuple[str, np.ndarray, int]]) -> dict[str, tuple[list, int]] | None:
        """{split: (token arrays, bytes)} by a hash of document names, or None when the corpus has too few
        documents for it (see the module docstring)."""
        splits: dict[str, tuple[list, int]] = {"train": ([], 0), "validation": ([], 0), "test": ([], 0)}
        for name, ids, nbytes in docs:
            if is_validation(name, self.val_fraction):
                split = "validation"
            elif self.test_fraction and is_validation(name, self.val_fraction + self.test_fraction):
                split = "test"  # the next slice of the same hash range: documents in neither train nor validation
            else:
                split = "train"
            parts, total = splits[split]
            parts.append(ids)
            splits[split] = (parts, total + nbytes)
        n_tokens = {k: sum(len(a) for a in parts) for k, (parts, _) in splits.items()}
        total = sum(n_tokens.values())
        window = self.seq_len + 1
        if n_tokens["train"] < window or n_tokens["validation"] < window:
            return None
        if n_tokens["validation"] > MAX_HELD_OUT_RATIO * self.val_fraction * total:
            return None
        if self.test_fraction and n_tokens["test"] > MAX_HELD_OUT_RATIO * self.test_fraction * total:
            return None
        return splits

    def _split_by_position(self, docs: list[tuple[str, np.ndarray, int]]) -> dict[str, tuple[list, int]]:
        """{split: (token arrays, bytes)}: each document cut at 1 - v - t and 1 - t of its tokens."""
        splits: dict[str, tuple[list, int]] = {"train": ([], 0), "validation": ([], 0), "test": ([], 0)}
        for _, ids, nbytes in docs:
            n = len(ids)
            cuts = [0, round(n * (1 - self.val_fraction - self.test_fraction)), round(n * (1 - self.test_fraction)), n]
            for split, lo, hi in zip(("train", "validation", "test"), cuts[:-1], cuts[1:], strict=True):
                if hi > lo:
                    parts, total = splits[split]
                    parts.append(ids[lo:hi])
                    splits[split] = (parts, total + round(nbytes * (hi - lo) / n))  # bytes: pro rata
        return splits

    def _check_fingerprint(self, saved: dict[str, Any]) -> None:
        """Stop when the checkpoint's corpus differs from this one (its data position would mean other data)."""
        current = self.fingerprint
        changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if not changed:
            return
        what = ", ".join(f"{k} {saved.get(k)} -> {current.get(k)}" for k in changed[:3])
        if self.allow_changed:
            log.warning("data.allow_changed=true: resuming on a changed corpus (%s).", what)
            return
        raise ConfigError(
            f"The corpus differs from the one the checkpoint was trained on ({what}), so the saved data position "
            "would point at other data. Resume with the same data settings, or set data.allow_changed=true to "
            "continue on the new corpus."
        )

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
        n = len(self.val_set) if self.val_sequences is None else min(self.val_sequences, len(self.val_set))
        sampler = GlobalOrderSampler(n, self.batch_size, rank, world, shuffle=False, drop_last=False)
        return DataLoader(self.val_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The held-out test split (data.test_fraction > 0), else the validation split (say so in the results)."""
        assert self.val_set is not None, "call setup() first"
        split = self.test_set if self.test_set is not None else self.val_set
        rank, world = self._eval_rank_world()
        sampler = GlobalOrderSampler(len(split), self.batch_size, rank, world, shuffle=False, drop_last=False)
        return DataLoader(split, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        """Data position (the epoch and the global samples consumed in it, world-size independent) and the
        corpus fingerprint."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            state: dict[str, Any] = dict(self._resume)
        else:
            _, world = self._rank_world()
            # `processed`, not `completed`: ModelCheckpoint(every_n_train_steps) saves in on_train_batch_end, after
            # the batch was trained on but before Lightning counts it completed (at validation end both are equal).
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            state = {"epoch": trainer.current_epoch, "samples": batches * self.batch_size * world}
        if self.fingerprint:
            state["corpus"] = dict(self.fingerprint)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data position; a checkpoint with a corpus fingerprint is checked against this corpus
        (now, or once the corpus is read). Checkpoints from before fingerprints existed are not checked."""
        self._resume = {"epoch": int(state_dict["epoch"]), "samples": int(state_dict["samples"])}
        saved = state_dict.get("corpus")
        if saved is None:
            return
        self._saved_fingerprint = dict(saved)
        if self.fingerprint:
            self._check_fingerprint(self._saved_fingerprint)


def corpus_fingerprint(
    docs: list[tuple[str, np.ndarray, int]], tokens: dict[str, np.ndarray], mode: str, seq_len: int
) -> dict[str, Any]:
    """What a data position means: documents (names and sizes), how they were split, and a hash of each split's
    tokens (so a changed tokenizer, fraction or file shows too). Short hex digests keep the error readable."""
    files = hashlib.sha256()
    for name, _, nbytes in docs:
        files.update(f"{name}\0{nbytes}\n".encode())

    def digest(a: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int32).tobytes()).hexdigest()[:12]

    return {
        "documents": len(docs),
        "bytes": int(sum(d[2] for d in docs)),
        "files": files.hexdigest()[:12],
        "split": mode,
        "seq_len": int(seq_len),
        **{f"{k}_tokens": digest(v) for k, v in tokens.items()},
    }
