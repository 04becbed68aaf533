"""Structured-config schemas for the top level and for the groups that have no `_target_`.

Groups with a `_target_` (model, data, callbacks, logger) are checked against the target's
constructor signature instead (see validate.py), so adding a keyword argument to a class is enough
to make it configurable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = "outputs"
    log_dir: str = "outputs"


@dataclass
class TopConfig:
    """Top-level keys of train.yaml."""

    task_name: str = "train"
    seed: int = 1234
    ckpt_path: Any = None
    resume: Any = "auto"
    tags: list[str] = field(default_factory=list)
    train: bool = True
    validate_at_end: bool = True
    test: bool = False
    sample_lines: int = 3
