"""Document sources: each yields (name, bytes) pairs in a deterministic order.

- StdlibSource: the Python standard library's own source files on this machine (real text, no download).
- TextFilesSource: a user's files or folders.
- HFDiskDatasetSource: a Hugging Face dataset saved on local disk with `save_to_disk`.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

from moe_plugin.errors import ConfigError


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


class TextFilesSource:
    """Files, or every file matching `pattern` under folders, listed in `paths`."""

    def __init__(self, paths: Sequence[str], pattern: str = "*", max_bytes: int | None = None) -> None:
        if isinstance(paths, str):
            paths = [paths]
        if not paths:
            raise ConfigError(
                "data.source.paths is empty: give files or folders, e.g. data.source.paths=[/data/books]."
            )
        self.paths = [Path(p).expanduser() for p in paths]
        self.pattern = pattern
        self.max_bytes = max_bytes
        for p in self.paths:
            if not p.exists():
                raise ConfigError(
                    f"data.source.paths entry {str(p)!r} does not exist. Fix the path, or list existing files "
                    "or folders: data.source.paths=[/path/a.txt,/path/folder]."
                )

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return cap_bytes(self._documents(), self.max_bytes)

    def _documents(self) -> Iterator[tuple[str, bytes]]:
        for p in self.paths:
            files = [p] if p.is_file() else sorted(f for f in p.rglob(self.pattern) if f.is_file())
            for f in files:
                data = f.read_bytes()
                if data:
                    yield str(f), data


class HFDiskDatasetSource:
    """Rows of a `datasets` dataset saved with `save_to_disk`; `text_field` holds the text."""

    def __init__(self, path: str, split: str = "train", text_field: str = "text", max_bytes: int | None = None) -> None:
        if not Path(path).expanduser().exists():
            raise ConfigError(
                f"data.source.path={path!r} does not exist. Save a dataset there first with "
                "datasets.Dataset.save_to_disk(path); nothing is downloaded at run time."
            )
        self.path, self.split, self.text_field = str(Path(path).expanduser()), split, text_field
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
