"""Shortcut annealing (SPEC §3, merge-aware training): γ(t), the factor of every shortcut term during training.

ResLoRA's `is` / `ms` shortcuts read earlier blocks' inputs, which a merged weight cannot see, so their merge
is approximate. Annealing keeps γ = 1 for most of training (the shortcuts' early speed-up) and takes it to
exactly 0 at the last step along a half cosine, so the trained model *is* a plain LoRA and merges exactly.
The cosine starts and ends flat: the factors absorb the shortcuts' share gradually, and the last steps run
at γ ≈ 0, so they fit the model that is deployed.
"""

from __future__ import annotations

import math

DEFAULT_ANNEAL_FRACTION = 0.3


def shortcut_anneal_factor(step: int, total_steps: int, fraction: float = DEFAULT_ANNEAL_FRACTION) -> float:
    """γ for optimizer step `step` (1-based) of `total_steps`: 1, then a half cosine over the last `fraction`, 0 at the end.

    `fraction` 0 switches annealing off (γ = 1 throughout). Steps after `total_steps` get 0.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the annealing fraction must be in [0, 1], got {fraction!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    if fraction == 0:
        return 1.0
    anneal_steps = max(1, round(fraction * total_steps))
    start = total_steps - anneal_steps
    if step <= start:
        return 1.0
    if step >= total_steps:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - start) / anneal_steps))
