"""Learning-rate schedules as multipliers of the peak LR (for torch.optim.lr_scheduler.LambdaLR).

- "cosine":   linear warmup 0 -> 1 over warmup_steps, cosine decay to min_lr_ratio at total_steps.
- "constant": linear warmup, then 1.
- "ling":     the Ling-Plus recipe (arXiv 2503.05139, sec. 2): linear warmup, hold, halve once
              `halve_at` of training is done; from `anneal_at` an inverse-square-root decay that
              reaches min_lr_ratio at total_steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("cosine", "constant", "ling")


def lr_multiplier(
    schedule: str = "cosine",
    warmup_steps: int = 100,
    total_steps: int = 1000,
    min_lr_ratio: float = 0.1,
    halve_at: float = 0.6,
    anneal_at: float = 1.0,
) -> Callable[[int], float]:
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={schedule!r} is not one of {SCHEDULES}.")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            f"optim.warmup_steps={warmup_steps} and total steps={total_steps}: need warmup_steps >= 0 and "
            "trainer.max_steps >= 1."
        )

    def warmup(step: int) -> float | None:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return None

    def cosine(step: int) -> float:
        w = warmup(step)
        if w is not None:
            return w
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def constant(step: int) -> float:
        w = warmup(step)
        return 1.0 if w is None else w

    def ling(step: int) -> float:
        w = warmup(step)
        if w is not None:
            return w
        base = 0.5 if step >= halve_at * total_steps else 1.0
        anneal_start = int(anneal_at * total_steps)
        if step < anneal_start or anneal_start >= total_steps:
            return base
        # inverse square root from `base` at anneal_start to min_lr_ratio at total_steps
        span = total_steps - anneal_start
        t = (step - anneal_start) / span
        k = (base / min_lr_ratio) ** 2 - 1  # base / sqrt(1 + k*t) hits min_lr_ratio at t = 1
        return base / math.sqrt(1 + k * min(t, 1.0))

    return {"cosine": cosine, "constant": constant, "ling": ling}[schedule]
