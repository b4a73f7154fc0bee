"""
Schedules over training progress: the curriculum for the masking ceiling (Eq. 4), and the
learning rate (linear warmup, then cosine decay to a floor).
"""

import math


def gamma_max_at(step, gamma_max, sharpness, midpoint, curriculum="sigmoid"):
    """Eq. (4): gamma_max(j) = gamma_max / (1 + exp(-k (j - j0))), with k = sharpness, j0 = midpoint.

    `step` (j) is in the unit of `midpoint` and `1 / sharpness`: optimizer steps, or target epochs.
    The ceiling is near 0 early, so training starts as fast as the baseline, reaches
    gamma_max / 2 at j0, and approaches gamma_max once memorization threatens (Sec. 3.3).
    curriculum="constant" holds it at gamma_max from the start: the fixed-ratio ablation (Fig. 2b).
    """
    if curriculum == "constant":
        return gamma_max
    exponent = -sharpness * (step - midpoint)
    if exponent > 700.0:  # exp would overflow a float; the ceiling is 0 to double precision
        return 0.0
    return gamma_max / (1.0 + math.exp(exponent))


def learning_rate_at(step, learning_rate, min_lr, warmup_steps, max_steps):
    """Linear warmup over warmup_steps, then cosine decay from learning_rate to min_lr at max_steps.
    min_lr == learning_rate gives a constant rate after warmup (the CPU demo uses that)."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (learning_rate - min_lr) * (1.0 + math.cos(math.pi * progress))
