"""
Schedules over training progress: the curriculum for the masking ceiling (Eq. 4), where its
midpoint comes from (Sec. 3.3), and the learning rate (linear warmup, then cosine decay to a floor).
"""

import math


def gamma_max_at(step, gamma_max, sharpness, midpoint, curriculum="sigmoid"):
    """Eq. (4): gamma_max(j) = gamma_max / (1 + exp(-k (j - j0))), with k = sharpness,
    j0 = midpoint.

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


def turning_epoch(epochs, losses, window=3):
    """Sec. 3.3's j0, read off a baseline run: the epoch at which its target validation loss,
    averaged over a centred window of `window` evaluations, is lowest. Evaluations scatter by
    about 0.01 nats from one to the next, so a single lucky one must not decide; a centred window
    leaves the minimum of a symmetric dip where it is. A curve that never turns gives its last
    epoch."""
    half = window // 2
    smoothed = [sum(losses[max(0, i - half):i + half + 1])
                / len(losses[max(0, i - half):i + half + 1]) for i in range(len(losses))]
    return float(epochs[min(range(len(smoothed)), key=smoothed.__getitem__)])


def turn_by_patience(epochs, losses, patience):
    """j0 found during the run itself, with no baseline: once the target validation loss has not
    improved on its best for `patience` evaluations in a row, the epoch of that best evaluation
    (where the curve turned, as Sec. 3.3 reads it off a baseline); None while it still improves.
    epochs, losses: the run's evaluations so far."""
    if not losses:
        return None
    best = min(range(len(losses)), key=losses.__getitem__)  # the first of equal minima
    return float(epochs[best]) if len(losses) - 1 - best >= patience else None


def learning_rate_at(step, learning_rate, min_lr, warmup_steps, max_steps):
    """Linear warmup over warmup_steps, then cosine decay from learning_rate to min_lr at max_steps.
    min_lr == learning_rate gives a constant rate after warmup (the CPU demo uses that)."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (learning_rate - min_lr) * (1.0 + math.cos(math.pi * progress))
