"""
Input perturbations of the scarce target rows: entropy-gated token dropout (EntroDrop, Eqs. 2-3),
its ablations, vanilla token dropout, and NEFTune. The fill itself (Eq. 1) happens in model.py,
which replaces masked positions by the base model's mean input embedding.

Every random draw comes from a generator seeded by (seed, step, purpose[, the row's stable
sample index]), never from a global RNG. So a run draws the same gamma_j and the same mask for
a given window at a given step whatever the number of ranks or micro-batches it is split into,
and a resumed run draws exactly what the uninterrupted one would have.
General (replay) rows are never perturbed (Sec. 3.1).
"""

import math

import numpy as np
import torch

# Targeting modes: which tokens of a target row are eligible for dropout.
#   low     the gate_percentile share of lowest-score tokens: EntroDrop (Eq. 2)
#   high    the same share of highest-score tokens: the ablation of Table 3
#   random  a random share of the same size: the matched-budget control for Table 3
#   all     every token: vanilla token dropout
TARGETING_MODES = ("low", "high", "random", "all")

# What a draw is for, kept apart in the seeds (HIDDEN_DROPOUT: train.py's per-step global seed).
GAMMA, MASK_UNIFORM, RANDOM_SCORES, NEFTUNE_NOISE, HIDDEN_DROPOUT = range(5)


def seed_for(seed, step, purpose, index=0) -> int:
    """A 64-bit seed that depends only on these integers (index: a window's sample index, or a
    rank)."""
    high_bits, low_bits = np.random.SeedSequence([seed, step, purpose, index]).generate_state(
        2, dtype=np.uint32)
    return int(high_bits) << 32 | int(low_bits)


def generator_for(seed, step, purpose, sample_index=0, device="cpu"):
    """A torch.Generator whose state depends only on these integers."""
    return torch.Generator(device=device).manual_seed(seed_for(seed, step, purpose, sample_index))


def draw_gamma(seed, step, gamma_max_j) -> float:
    """gamma_j ~ U(0, gamma_max(j)), drawn once per optimizer step (Sec. 3.1)."""
    return gamma_max_j * torch.rand((), generator=generator_for(seed, step, GAMMA)).item()


def row_uniforms(seed, step, purpose, sample_index, length) -> torch.Tensor:
    """(b, length) U[0, 1) draws, row r from its own generator keyed by sample_index[r]; zeros on
    general rows (sample index -1), which are never perturbed."""
    rows = [torch.rand(length, generator=generator_for(seed, step, purpose, i)) if i >= 0
            else torch.zeros(length)
            for i in sample_index.tolist()]
    return torch.stack(rows)


def gate(scores, gate_percentile, targeting) -> torch.Tensor:
    """Eq. (2), per row: scores (b, T) float with NaN where a token has no score (column 0 has no
    prediction) -> bool (b, T) of tokens eligible for dropout.

    Of a row's n scored tokens exactly floor(gate_percentile * n) are eligible. Ties are broken by
    position: tokens are ranked by (score, position) ascending, `low` takes the first of that
    order and `high` the last, so at gate_percentile <= 0.5 the two never overlap."""
    scored = ~torch.isnan(scores)
    if targeting == "all":
        return scored
    n_scored = scored.sum(dim=-1, keepdim=True)                      # (b, 1)
    # In float64: in the default float32, 0.65 * 180 rounds to 116.99999 and the 1e-9 is lost
    # below float32's resolution; in float64 the 1e-9 absorbs the error (0.29 * 100 is 28.999...).
    n_gated = torch.floor(gate_percentile * n_scored.double() + 1e-9)  # (b, 1)
    order = scores.masked_fill(~scored, math.inf).argsort(dim=-1, stable=True)  # unscored sort last
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    if targeting == "low":
        return rank < n_gated
    if targeting == "high":
        return (rank >= n_scored - n_gated) & scored
    raise ValueError(f"gate targeting {targeting!r} must be 'low', 'high' or 'all'")


def sample_mask(eligible, gamma, target_rows, uniform) -> torch.Tensor:
    """Eq. (3): P(m_t = 0) = gamma * g_t. eligible (b, T) bool, target_rows (b,) bool,
    uniform (b, T) U[0, 1) draws -> bool (b, T), True where the input token is dropped."""
    return eligible & (uniform < gamma) & target_rows[:, None]


def token_dropout_mask(scores, target_rows, sample_index, seed, step, gamma, targeting,
                       gate_percentile):
    """The dropout mask of one micro-batch: scores (b, T) from the entropy cache (NaN on general
    rows and at column 0) -> bool (b, T)."""
    length = scores.shape[1]
    if targeting == "random":  # the same number of eligible tokens as `low`, chosen at random
        random_scores = row_uniforms(seed, step, RANDOM_SCORES, sample_index, length)
        scores = random_scores.masked_fill(torch.isnan(scores), math.nan)
    eligible = gate(scores, gate_percentile, "low" if targeting == "random" else targeting)
    uniform = row_uniforms(seed, step, MASK_UNIFORM, sample_index, length)
    return sample_mask(eligible, gamma, target_rows, uniform)


def row_scores(scores, sample_index, target_rows, seq_len) -> torch.Tensor:
    """The gate's scores of a micro-batch, aligned to its input positions: scores (n_windows,
    seq_len + 1) per target window, where column t scores token x_t (the entropy of predicting it
    from x_<t; NaN at t = 0, which nothing predicts) -> (b, seq_len), the score of input x_t at
    column t, and NaN on general rows (sample_index -1), which are never gated."""
    rows = scores[sample_index.clamp(min=0), :seq_len]   # a copy: (b, seq_len)
    rows[~target_rows] = math.nan
    return rows


def refresh_scores(scores, sample_index, entropy, fill_mask):
    """Online scores: each target window's scores take the entropies of its latest training pass,
    for its next visit. entropy (b, seq_len): position j's next-token entropy, which scores x_{j+1};
    fill_mask (b, seq_len): the inputs that pass replaced by the mean embedding.
    That pass saw masked inputs, so its context was perturbed. The reading kept here: x_{j+1}'s
    score is refreshed only where input x_j was kept. Right after a filled position the model
    predicts from e_bar, and that inflated entropy would wrongly shield x_{j+1} from the gate at
    its next visit; there the previous score stays. scores (n_windows, seq_len + 1) is updated in
    place; general rows (sample_index -1) are skipped."""
    target = sample_index >= 0
    windows = sample_index[target]
    rows = scores[windows]                                # (k, seq_len + 1), a copy
    kept = ~fill_mask[target]
    rows[:, 1:][kept] = entropy[target][kept].to(scores.dtype)
    scores[windows] = rows


def neftune_noise(shape, sample_index, lengths, alpha, seed, step, device) -> torch.Tensor:
    """NEFTune: U(-1, 1) noise scaled by alpha / sqrt(L * d), L the row's real (unpadded) length,
    d the embedding width -> shape (b, T, d), to add to the input embeddings of target rows; zero
    on general rows and past each row's length. Training only."""
    noise = torch.zeros(shape, device=device)
    hidden_size = shape[-1]
    for r, (i, L) in enumerate(zip(sample_index.tolist(), lengths.tolist())):
        if i >= 0:
            g = generator_for(seed, step, NEFTUNE_NOISE, i, device=device)
            u = torch.rand(L, hidden_size, generator=g, device=device)
            noise[r, :L] = (2 * u - 1) * (alpha / math.sqrt(L * hidden_size))
    return noise
