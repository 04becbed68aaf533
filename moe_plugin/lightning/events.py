"""Reliability events as JSON lines in the run folder (one object per line, appended and flushed).

    {"time": 1732370000.1, "source": "spike_guard", "event": "skip", "step": 130, ...}

Written by global rank 0 only. The file survives crashes up to the last flushed line, can be tailed during a
run (`tail -f <run>/events.jsonl`) and read with `pandas.read_json(path, lines=True)`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

EVENTS_FILE = "events.jsonl"


def events_path(trainer: pl.Trainer, events_file: str | None) -> Path:
    """`events_file` if given, else `<trainer.default_root_dir>/events.jsonl` (the run folder)."""
    return Path(events_file) if events_file else Path(trainer.default_root_dir) / EVENTS_FILE


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them readable
    return v


def append_event(path: Path, source: str, event: str, **fields: Any) -> None:
    """Append one event line to `path` (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"time": round(time.time(), 3), "source": source, "event": event}
    record.update({k: _jsonable(v) for k, v in fields.items()})
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_events(path: Path | str) -> list[dict[str, Any]]:
    """All events in a JSON-lines file (empty list if it does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
