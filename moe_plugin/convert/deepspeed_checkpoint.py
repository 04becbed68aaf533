"""DeepSpeed checkpoint directories written by the deepspeed_ep strategy, and their conversion.

A DeepSpeed checkpoint (engine.save_checkpoint, strategy.checkpoint_format=deepspeed) is a directory

    P/latest                                  the tag of the newest save ("checkpoint" under Lightning)
    P/<tag>/mp_rank_00_model_states.pt        dense module weights and the client state (Lightning's dict)
    P/<tag>/*zero_pp_rank_<r>_*optim_states.pt ZeRO partitions of rank r (fp32 masters, optimizer state)
"""

from __future__ import annotations

import os
from pathlib import Path


def deepspeed_tag_dir(path: str | os.PathLike[str]) -> Path | None:
    """The folder holding a DeepSpeed save (P/<latest tag>), or None when `path` is not a DeepSpeed checkpoint."""
    p = Path(path)
    if not p.is_dir():
        return None
    latest = p / "latest"
    candidates = [p / latest.read_text().strip()] if latest.is_file() else []
    candidates.append(p)
    for c in candidates:
        if c.is_dir() and any(c.glob("*model_states.pt")):
            return c
    return None


def is_deepspeed_checkpoint(path: str | os.PathLike[str]) -> bool:
    return deepspeed_tag_dir(path) is not None
