"""The SAE learning-rate schedule: linear warmup → cosine decay → floor (the card's 2e-4 → 6e-5).

Why a pure function of the step: a resumed run must use exactly the LR an uninterrupted run
would have used, so the schedule keeps no state of its own.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, lr_floor: float, warmup_steps: int, total_steps: int) -> float:
    """LR for optimizer step ``step`` (0-based).

    Warmup: ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (never 0, so
    step 0 already learns). Then a half cosine from ``lr`` down to ``lr_floor`` reached at the last
    step; steps past ``total_steps`` stay at the floor.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    t = min((step - warmup_steps) / decay_steps, 1.0)
    return lr_floor + 0.5 * (lr - lr_floor) * (1.0 + math.cos(math.pi * t))
