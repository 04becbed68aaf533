"""Document sources: each yields (name, bytes) pairs in a deterministic order.

- StdlibSource: the Python standard library's own source files on this machine (real text, no download).
- TextFilesSource: a user's files or folders (any mix; `~` and `$VARS` expand; binary files are skipped).
- HFDiskDatasetSource: a Hugging Face dataset saved on local disk with `save_to_disk`.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

from moe_plugin.errors import ConfigError

log = logging.getLogger(__name__)

# A corpus in which more than this fraction of the files is binary is refused: the paths (or the pattern) are
# most likely wrong, and the few text files left would train a model on a corpus the user did not mean.
MAX_BINARY_FRACTION = 0.5


def cap_bytes(docs: Iterator[tuple[str, bytes]], max_bytes: int | None) -> Iterator[tuple[str, bytes]]:
    """Stop after the document that reaches `max_bytes` in total (None: no cap)."""
    total = 0
    for name, data in docs:
        yield name, data
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            return


class StdlibSource:
    """`*.py` files of the running interpreter's standard library (site-packages excluded)."""

    def __init__(self, max_bytes: int | None = None, include_tests: bool = False) -> None:
        self.max_bytes = max_bytes
        self.include_tests = include_tests
        self.root = Path(sysconfig.get_paths()["stdlib"])

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return cap_bytes(self._documents(), self.max_bytes)

    def _documents(self) -> Iterator[tuple[str, bytes]]:
        for path in sorted(self.root.rglob("*.py")):
            rel = path.relative_to(self.root).as_posix()
            if rel.startswith(("site-packages/", "dist-packages/")) or "/site-packages/" in rel:
                continue
            if not self.include_tests and (rel.startswith(("test/", "idlelib/idle_test/")) or "/tests/" in rel):
                continue
            data = path.read_bytes()
            if data:
                yield rel, data


def expand_path(path: str | os.PathLike[str]) -> Path:
    """`~` and `$VARS` expanded, as a user typing a path on a command line expects."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def is_text(data: bytes) -> bool:
    """True for UTF-8 text. Binary files (images, archives, compiled code) hold NUL bytes or byte sequences that
    are not UTF-8; a few stray invalid bytes (a Latin-1 name in a README) still count as text:

        text  <=>  no NUL byte  and  undecodable bytes <= 1% of the file
    """
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        bad = data.decode("utf-8", errors="replace").count("\ufffd") - data.decode("utf-8", errors="ignore").count(
            "\ufffd"
        )
        return bad <= 0.01 * len(data)


class TextFilesSource:
    """Files, or every file matching `pattern` under folders, listed in `paths` (any mix of both).

    A document's name is its path relative to the listed folder, prefixed with the folder's name (a listed
    file: its name), so the train/validation split does not change when the corpus moves to another place.
    Files that are not UTF-8 text are skipped with one warning counting them; a corpus with more binary than
    text files is refused (the paths or `data.source.pattern` are most likely wrong).
    """

    def __init__(self, paths: Sequence[str], pattern: str = "*", max_bytes: int | None = None) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [str(paths)]
        if not paths:
            raise ConfigError(
                "data.source.paths is empty: give files or folders, e.g. data.source.paths=[/data/books]."
            )
        self.paths = [expand_path(p) for p in paths]
        self.pattern = pattern
        self.max_bytes = max_bytes
        self.skipped: list[str] = []  # binary files skipped by the last full pass
        for given, p in zip(paths, self.paths, strict=True):
            if not p.exists():
                unexpanded = " (an environment variable in it is not set)" if "$" in str(p) else ""
                raise ConfigError(
                    f"data.source.paths entry {str(given)!r} does not exist{unexpanded}. Fix the path, or list "
                    "existing files or folders: data.source.paths=[/path/a.txt,/path/folder]."
                )

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return cap_bytes(self._documents(), self.max_bytes)

    def files(self) -> Iterator[tuple[str, Path]]:
        """(document name, file) of every file listed, in a deterministic order."""
        for p in self.paths:
            if p.is_file():
                yield p.name, p
                continue
            for f in sorted(f for f in p.rglob(self.pattern) if f.is_file()):
                yield f"{p.name}/{f.relative_to(p).as_posix()}", f

    def _documents(self) -> Iterator[tuple[str, bytes]]:
        skipped: list[str] = []
        n_text = 0
        for name, f in self.files():
            data = f.read_bytes()
            if not data:
                continue
            if not is_text(data):
                skipped.append(str(f))
                continue
            n_text += 1
            yield name, data
        self.skipped = skipped
        if skipped:
            self._report_binary(skipped, n_text)

    def _report_binary(self, skipped: list[str], n_text: int) -> None:
        total = len(skipped) + n_text
        if len(skipped) > MAX_BINARY_FRACTION * total:
            raise ConfigError(
                f"data.source.paths: {len(skipped)} of {total} files are binary, not UTF-8 text (e.g. "
                f"{skipped[0]}). Point data.source.paths at text, or select text files with data.source.pattern "
                "(e.g. data.source.pattern='*.txt')."
            )
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank == 0:  # every rank reads the corpus; one warning is enough
            log.warning(
                "data.source.paths: skipped %d of %d files that are not UTF-8 text (e.g. %s); set "
                "data.source.pattern to select text files only.",
                len(skipped),
                total,
                skipped[0],
            )


class HFDiskDatasetSource:
    """Rows of a `datasets` dataset saved with `save_to_disk`; `text_field` holds the text."""

    def __init__(self, path: str, split: str = "train", text_field: str = "text", max_bytes: int | None = None) -> None:
        if not expand_path(path).exists():
            raise ConfigError(
                f"data.source.path={path!r} does not exist. Save a dataset there first with "
                "datasets.Dataset.save_to_disk(path); nothing is downloaded at run time."
            )
        self.path, self.split, self.text_field = str(expand_path(path)), split, text_field
        self.max_bytes = max_bytes

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return cap_bytes(self._documents(), self.max_bytes)

    def _documents(self) -> Iterator[tuple[str, bytes]]:
        try:
            import datasets
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("data=hf_dataset needs the `datasets` package: pip install datasets") from err
        ds = datasets.load_from_disk(self.path)
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise KeyError(f"data.source.split={self.split!r} not in the dataset; it has {sorted(ds)}.")
            ds = ds[self.split]
        if self.text_field not in ds.column_names:
            raise KeyError(
                f"data.source.text_field={self.text_field!r} is not a column; columns are {ds.column_names}."
            )
        for i, row in enumerate(ds):
            text = row[self.text_field]
            if text:
                yield f"{self.path}#{i}", text.encode("utf-8")
