"""dropout.py, the fill of masked inputs in model.py, and schedule.py: the entropy gate (Eq. 2),
the mask and its statistics over many steps (Eq. 3), the ablation targetings, determinism of
every draw, the mean-embedding fill and its zero ablation (Eq. 1, Appendix A.3), NEFTune, the
masking-ceiling curriculum (Eq. 4) and the learning-rate schedule."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from dropout import draw_gamma, gate, neftune_noise, token_dropout_mask
from model import ModelConfig, Transformer
from schedule import gamma_max_at, learning_rate_at, turning_epoch

NAN = float("nan")
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=64)


# ---- the gate (Eq. 2) ---------------------------------------------------------------------------

def scores_with_holes(n_rows=200, seed=0):
    """(n_rows, n_rows + 1) scores: NaN at column 0, and row r has r + 1 scored tokens at random
    positions, so every count n from 1 to n_rows occurs (0.65 * 180 and 0.29 * 100 among them)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.full((n_rows, n_rows + 1), NAN)
    for r in range(n_rows):
        where = 1 + torch.randperm(n_rows, generator=g)[:r + 1]
        scores[r, where] = torch.rand(r + 1, generator=g) * 5
    return scores


def exact_count(p, n):
    """floor(p * n) in exact arithmetic, p as written."""
    return math.floor(Fraction(str(p)) * n)


def reference_gate(scores, p, targeting):
    """Eq. (2) row by row: rank the scored tokens by (score, position); low takes the first
    floor(p * n), high the last floor(p * n)."""
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for r, row in enumerate(scores.tolist()):
        ranked = sorted((s, t) for t, s in enumerate(row) if not math.isnan(s))
        k = exact_count(p, len(ranked))
        chosen = ranked[:k] if targeting == "low" else ranked[len(ranked) - k:]
        out[r, [t for _, t in chosen]] = True
    return out


@pytest.mark.parametrize("p", [0.1, 0.29, 0.5, 0.65, 0.7])
def test_gate_takes_exactly_floor_p_n_lowest_or_highest(p):
    scores = scores_with_holes()
    n = (~scores.isnan()).sum(dim=1)
    for targeting in ("low", "high"):
        eligible = gate(scores, p, targeting)
        assert eligible.sum(dim=1).tolist() == [exact_count(p, k) for k in n.tolist()]
        assert torch.equal(eligible, reference_gate(scores, p, targeting))


def test_gate_low_below_high_above_every_other_scored_token():
    scores = scores_with_holes(60)
    low, high = gate(scores, 0.3, "low"), gate(scores, 0.3, "high")
    for r in range(len(scores)):
        scored = ~scores[r].isnan()
        if low[r].any():
            assert scores[r][low[r]].max() <= scores[r][scored & ~low[r]].min()
            assert scores[r][high[r]].min() >= scores[r][scored & ~high[r]].max()


def test_gate_ties_are_broken_by_position():
    scores = torch.full((3, 11), 2.0)
    scores[:, 0] = NAN
    scores[1, 4] = NAN
    scores[2, 1:] = torch.tensor([1.0, 2, 2, 1, 2, 2, 1, 2, 2, 1])
    low, high = gate(scores, 0.5, "low"), gate(scores, 0.5, "high")
    # All equal: the first half of the scored positions is low, the last half high.
    assert low[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    assert high[0].nonzero().flatten().tolist() == [6, 7, 8, 9, 10]
    assert low[1].nonzero().flatten().tolist() == [1, 2, 3, 5]  # 9 scored: 4 each
    assert high[1].nonzero().flatten().tolist() == [7, 8, 9, 10]
    # 1.0 at 1, 4, 7, 10 and 2.0 elsewhere: ranked (score, position), high takes the last five.
    assert low[2].nonzero().flatten().tolist() == [1, 2, 4, 7, 10]
    assert high[2].nonzero().flatten().tolist() == [3, 5, 6, 8, 9]


@pytest.mark.parametrize("kind", ["all_equal", "float16", "two_values"])
def test_gate_low_and_high_never_overlap_at_one_half(kind):
    g = torch.Generator().manual_seed(1)
    scores = {"all_equal": torch.ones(64, 97),
              "float16": (torch.randn(64, 97, generator=g) * 1e-3 + 3).half().float(),
              "two_values": torch.randint(0, 2, (64, 97), generator=g).float()}[kind]
    scores[:, 0] = NAN
    scores[torch.rand(64, 97, generator=g) < 0.2] = NAN
    low, high = gate(scores, 0.5, "low"), gate(scores, 0.5, "high")
    n = (~scores.isnan()).sum(dim=1)
    assert not (low & high).any()
    assert torch.equal(low.sum(dim=1), n // 2) and torch.equal(high.sum(dim=1), n // 2)


@pytest.mark.parametrize("targeting", ["low", "high", "all"])
def test_unscored_tokens_are_never_eligible(targeting):
    scores = scores_with_holes(50)
    eligible = gate(scores, 0.7, targeting)
    assert not eligible[:, 0].any()
    assert not (eligible & scores.isnan()).any()
    if targeting == "all":
        assert torch.equal(eligible, ~scores.isnan())


# ---- the mask (Eq. 3) and its targetings --------------------------------------------------------

SEED = 1234


def mixed_batch(T=64):
    """Six target rows (windows 0, 3, 5, 8, 13, 21) and three general rows, all with real-looking
    scores (general rows are never perturbed whatever their scores), NaN at column 0 and some
    holes so that rows have different numbers of scored tokens."""
    g = torch.Generator().manual_seed(7)
    sample_index = torch.tensor([0, 3, -1, 5, 8, -1, 13, 21, -1])
    scores = torch.rand(len(sample_index), T, generator=g) * 4
    scores[:, 0] = NAN
    scores[1, 10:20] = NAN
    scores[4, 30:] = NAN
    return scores, sample_index >= 0, sample_index


def masks_over_steps(gamma_max, targeting="low", steps=400, p=0.5):
    """(steps, b, T) float masks of mixed_batch(), gamma_j ~ U(0, gamma_max) drawn afresh each
    step, and the (steps,) gammas."""
    scores, target_rows, sample_index = mixed_batch()
    masks, gammas = [], []
    for step in range(steps):
        gamma = draw_gamma(SEED, step, gamma_max)
        gammas.append(gamma)
        masks.append(token_dropout_mask(scores, target_rows, sample_index, SEED, step, gamma,
                                        targeting, p))
    return torch.stack(masks).float(), torch.tensor(gammas, dtype=torch.float64)


def mean_and_standard_error(x):
    return x.mean().item(), (x.std() / math.sqrt(len(x))).item()


def test_draw_gamma_is_uniform_below_the_ceiling():
    gammas = torch.tensor([draw_gamma(SEED, step, 0.3) for step in range(2000)],
                          dtype=torch.float64)
    assert 0.0 <= gammas.min() and gammas.max() < 0.3 and gammas.max() > 0.29
    mean, se = mean_and_standard_error(gammas)
    assert abs(mean - 0.15) <= 3 * se
    assert draw_gamma(SEED, 5, 0.3) == draw_gamma(SEED, 5, 0.3) != draw_gamma(SEED, 6, 0.3)


def test_gated_tokens_of_target_rows_are_dropped_at_rate_expected_gamma():
    gamma_max, steps = 0.4, 400
    masks, _ = masks_over_steps(gamma_max, steps=steps)
    scores, target_rows, _ = mixed_batch()
    gated = gate(scores, 0.5, "low") & target_rows[:, None]               # (b, T)
    # gamma_j is shared by a step's tokens: the per-step rates are the independent samples.
    mean, se = mean_and_standard_error(masks[:, gated].mean(dim=1))
    assert abs(mean - gamma_max / 2) <= 3 * se
    # Each gated token alone: Bernoulli(E[gamma_j]) across steps, the same for every position.
    per_token = masks[:, gated].mean(dim=0)
    assert (per_token - gamma_max / 2).abs().max() <= 5 * math.sqrt(0.2 * 0.8 / steps)
    assert masks[:, ~gated].sum() == 0  # ungated tokens of target rows, general rows
    assert masks[:, ~target_rows].sum() == 0


def test_masking_rate_scales_with_gamma_max():
    masked_at_0_2 = masks_over_steps(0.2, steps=300)[0].sum().item()
    masked_at_0_4 = masks_over_steps(0.4, steps=300)[0].sum().item()
    assert masked_at_0_4 / masked_at_0_2 == pytest.approx(2.0, abs=0.1)


def test_random_targeting_has_the_same_budget_as_low():
    scores, target_rows, sample_index = mixed_batch()
    low_counts = gate(scores, 0.5, "low").sum(dim=1) * target_rows
    chosen = torch.zeros_like(target_rows[:, None] & ~scores.isnan())
    for step in range(60):
        # gamma = 1 drops every eligible token (uniforms are < 1), so the mask is the eligible set.
        eligible = token_dropout_mask(scores, target_rows, sample_index, SEED, step, 1.0,
                                      "random", 0.5)
        assert torch.equal(eligible.sum(dim=1), low_counts)
        assert not (eligible & scores.isnan()).any()
        chosen |= eligible
    # Every scored token gets its turn.
    assert torch.equal(chosen, target_rows[:, None] & ~scores.isnan())
    masks_random, _ = masks_over_steps(0.4, "random", steps=300)
    masks_low, _ = masks_over_steps(0.4, "low", steps=300)
    # Same gammas, step by step.
    difference = masks_random.sum(dim=(1, 2)) - masks_low.sum(dim=(1, 2))
    mean, se = mean_and_standard_error(difference)
    assert abs(mean) <= 3 * se


def test_all_targeting_makes_every_scored_token_of_target_rows_eligible():
    scores, target_rows, sample_index = mixed_batch()
    eligible = token_dropout_mask(scores, target_rows, sample_index, SEED, 0, 1.0, "all", 0.5)
    assert torch.equal(eligible, target_rows[:, None] & ~scores.isnan())


@pytest.mark.parametrize("targeting", ["low", "high", "random", "all"])
def test_row_mask_depends_only_on_seed_step_and_sample_index(targeting):
    scores, target_rows, sample_index = mixed_batch()
    args = (SEED, 17, 0.5, targeting, 0.5)
    whole = token_dropout_mask(scores, target_rows, sample_index, *args)
    order = torch.tensor([7, 2, 4, 0, 8, 5, 1, 3, 6])
    for micro in (order[:2], order[2:6], order[6:]):  # other micro-batches, rows in another order
        part = token_dropout_mask(scores[micro], target_rows[micro], sample_index[micro], *args)
        assert torch.equal(part, whole[micro])
    assert whole[target_rows].any()
    later = token_dropout_mask(scores, target_rows, sample_index, SEED, 18, 0.5, targeting, 0.5)
    other_seed = token_dropout_mask(scores, target_rows, sample_index, SEED + 1, 17, 0.5,
                                    targeting, 0.5)
    assert not torch.equal(later, whole) and not torch.equal(other_seed, whole)


# ---- the fill (Eq. 1, Appendix A.3) ------------------------------------------------------------

def pretrained(folder):
    """A tiny model saved and loaded back as a base checkpoint; its embeddings are offset so that
    their mean is far from zero and a mean fill is told apart from a zero fill."""
    torch.manual_seed(0)
    model = Transformer(TINY)
    with torch.no_grad():
        model.embed_tokens.weight.add_(torch.randn(TINY.hidden_size))
    model.save_pretrained(folder)
    return Transformer.from_pretrained(folder)


def input_embeddings(model, idx, **kwargs):
    """What the first block receives from body(): the input embeddings after fill and noise."""
    seen = []
    handle = model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    try:
        model.body(idx, **kwargs)
    finally:
        handle.remove()
    return seen[0]


def idx_and_mask(B=2, T=24):
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, TINY.vocab_size, (B, T + 1), generator=g)
    fill_mask = torch.rand(B, T, generator=g) < 0.3
    fill_mask[:, 0] = False
    fill_mask[0, 5] = True
    return idx[:, :-1], idx[:, 1:], fill_mask


def test_fill_embedding_is_the_mean_input_embedding_of_the_checkpoint(tmp_path):
    model = pretrained(tmp_path)
    embedding = model.embed_tokens.weight
    assert torch.allclose(model.fill_embedding, embedding.mean(dim=0), atol=1e-6)
    assert model.fill_embedding.abs().mean() > 0.3  # the offset: far from the zero vector
    idx, _, fill_mask = idx_and_mask()
    x = input_embeddings(model, idx, fill_mask=fill_mask)
    expected = torch.where(fill_mask[..., None], embedding.mean(dim=0), embedding[idx])
    torch.testing.assert_close(x, expected)


def test_masked_token_is_invisible_and_unmasked_one_is_not(tmp_path):
    model = pretrained(tmp_path)
    idx, _, fill_mask = idx_and_mask()
    with torch.no_grad():
        out = model.body(idx, fill_mask=fill_mask)
        masked_changed, unmasked_changed = idx.clone(), idx.clone()
        masked_changed[0, 5] = (idx[0, 5] + 1) % TINY.vocab_size
        t = (~fill_mask[0]).nonzero()[1].item()
        unmasked_changed[0, t] = (idx[0, t] + 1) % TINY.vocab_size
        assert torch.equal(model.body(masked_changed, fill_mask=fill_mask), out)
        changed = model.body(unmasked_changed, fill_mask=fill_mask)
    assert not torch.allclose(changed[0, t:], out[0, t:])
    torch.testing.assert_close(changed[0, :t], out[0, :t])  # causal: earlier positions unaffected


def test_fill_embedding_is_a_frozen_buffer_never_exported(tmp_path):
    model = pretrained(tmp_path / "base").train()
    fill = model.fill_embedding.clone()
    embedding = model.embed_tokens.weight.detach().clone()
    idx, targets, fill_mask = idx_and_mask()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        _, loss = model(idx, targets, fill_mask=fill_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert not torch.allclose(model.embed_tokens.weight.mean(dim=0), embedding.mean(dim=0),
                              atol=1e-4)
    assert torch.equal(model.fill_embedding, fill)
    assert "fill_embedding" not in dict(model.named_parameters())
    assert not model.fill_embedding.requires_grad
    assert torch.equal(model.state_dict()["fill_embedding"], fill)  # kept in training checkpoints
    model.save_pretrained(tmp_path / "export")
    with safe_open(str(tmp_path / "export" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "fill" in k]
    assert "fill" not in json.dumps(json.loads((tmp_path / "export" / "config.json").read_text()))


def test_labels_are_unchanged_under_the_fill(tmp_path):
    model = pretrained(tmp_path)
    idx, targets, fill_mask = idx_and_mask()
    with torch.no_grad():
        _, loss = model(idx, targets, fill_mask=fill_mask)
        logits = model(idx, fill_mask=fill_mask)
        _, clean_loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    assert not torch.allclose(loss, clean_loss)


def test_zero_fill_gives_zero_embeddings_at_masked_positions(tmp_path):
    model = pretrained(tmp_path)
    idx, _, fill_mask = idx_and_mask()
    with torch.no_grad():
        mean_filled = model.body(idx, fill_mask=fill_mask)
        model.fill_embedding.zero_()
        zero_filled = model.body(idx, fill_mask=fill_mask)
    x = input_embeddings(model, idx, fill_mask=fill_mask)
    assert torch.equal(x[fill_mask], torch.zeros_like(x[fill_mask]))
    assert torch.equal(x[~fill_mask], model.embed_tokens.weight[idx][~fill_mask])
    assert not torch.allclose(zero_filled, mean_filled)


# ---- NEFTune ------------------------------------------------------------------------------------

def test_neftune_noise_is_bounded_per_row_and_zero_elsewhere():
    sample_index, lengths, alpha, d = (torch.tensor([3, -1, 7, 12]), torch.tensor([30, 30, 5, 13]),
                                       5.0, 64)
    noise = neftune_noise((4, 30, d), sample_index, lengths, alpha, SEED, 9, "cpu")
    for r, (i, L) in enumerate(zip(sample_index.tolist(), lengths.tolist())):
        if i < 0:
            assert not noise[r].any()
            continue
        bound = alpha / math.sqrt(L * d)
        values = noise[r, :L].double().flatten()
        assert values.abs().max() <= bound * (1 + 1e-6) and values.abs().max() >= 0.95 * bound
        assert not noise[r, L:].any()
        mean, _ = mean_and_standard_error(values)
        assert abs(mean) <= 3 * bound / math.sqrt(3 * len(values))  # U(-b, b) has sd b / sqrt(3)
        inner = (values.abs() < bound / 2).double().mean().item()   # uniform: half within b / 2
        assert abs(inner - 0.5) <= 3 * math.sqrt(0.25 / len(values))
    assert noise[2].abs().max() > alpha / math.sqrt(30 * d)  # each row scaled by its own length


def test_neftune_noise_depends_only_on_seed_step_and_sample_index():
    args = (5.0, SEED, 9, "cpu")
    noise = neftune_noise((3, 16, 8), torch.tensor([4, -1, 2]), torch.tensor([16, 16, 16]), *args)
    reordered = neftune_noise((2, 16, 8), torch.tensor([2, 4]), torch.tensor([16, 16]), *args)
    assert torch.equal(reordered[0], noise[2]) and torch.equal(reordered[1], noise[0])
    later = neftune_noise((3, 16, 8), torch.tensor([4, -1, 2]), torch.tensor([16, 16, 16]), 5.0,
                          SEED, 10, "cpu")
    assert not torch.equal(later, noise)


def test_noise_enters_only_when_given(tmp_path):
    model = pretrained(tmp_path)
    idx, _, _ = idx_and_mask()
    noise = neftune_noise((*idx.shape, TINY.hidden_size), torch.tensor([0, 1]),
                          torch.tensor([24, 24]), 5.0, SEED, 0, "cpu")
    torch.testing.assert_close(input_embeddings(model, idx, embedding_noise=noise),
                               model.embed_tokens.weight[idx] + noise)
    with torch.no_grad():
        clean = model(idx)
        assert torch.equal(model(idx, embedding_noise=None), clean)
        assert not torch.allclose(model(idx, embedding_noise=noise), clean)


# ---- schedules (Eq. 4, learning rate) ------------------------------------------------------------

def test_gamma_max_curriculum_is_a_sigmoid_around_the_midpoint():
    gamma_max, k, j0 = 0.4, 0.5, 20
    assert gamma_max_at(j0, gamma_max, k, j0) == gamma_max / 2
    values = [gamma_max_at(j / 4, gamma_max, k, j0) for j in range(0, 161)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert gamma_max_at(j0 - 60, gamma_max, k, j0) < 1e-12
    assert gamma_max_at(j0 + 60, gamma_max, k, j0) == pytest.approx(gamma_max, abs=1e-12)
    assert gamma_max_at(-1e300, gamma_max, k, j0) == 0.0        # no OverflowError
    assert gamma_max_at(1e300, gamma_max, k, j0) == gamma_max
    assert gamma_max_at(j0 - 1e4, gamma_max, 1e4, j0) == 0.0
    # Symmetric: the ceiling gained at j0 + x is what is missing at j0 - x.
    assert gamma_max_at(j0 + 3, gamma_max, k, j0) + gamma_max_at(j0 - 3, gamma_max, k, j0) == \
        pytest.approx(gamma_max)


def test_constant_curriculum_holds_gamma_max():
    for j in (-1e300, 0, 3, 20, 1e300):
        assert gamma_max_at(j, 0.4, 0.5, 20, curriculum="constant") == 0.4


def test_learning_rate_warmup_then_cosine_to_the_floor():
    peak, floor, warmup, max_steps = 1e-3, 1e-4, 10, 110
    warm = [learning_rate_at(s, peak, floor, warmup, max_steps) for s in range(warmup)]
    assert warm == pytest.approx([peak * (s + 1) / warmup for s in range(warmup)])
    assert warm[-1] == pytest.approx(peak)
    decay = [learning_rate_at(s, peak, floor, warmup, max_steps)
             for s in range(warmup, max_steps + 1)]
    assert decay[0] == pytest.approx(peak)
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert learning_rate_at(warmup + 50, peak, floor, warmup, max_steps) == \
        pytest.approx((peak + floor) / 2)
    assert decay[-1] == pytest.approx(floor)
    assert learning_rate_at(max_steps + 40, peak, floor, warmup, max_steps) == pytest.approx(floor)


def test_learning_rate_is_constant_after_warmup_when_the_floor_is_the_peak():
    rates = [learning_rate_at(s, 3e-4, 3e-4, 5, 50) for s in range(4, 60)]
    assert rates == pytest.approx([3e-4] * len(rates))


def test_turning_epoch_on_synthetic_curves():
    epochs = [float(e) for e in range(41)]
    u_curve = [1.0 + 0.002 * (e - 9) ** 2 for e in epochs]  # bottoms at epoch 9
    assert turning_epoch(epochs, u_curve) == 9.0
    rng = np.random.default_rng(0)
    noisy = [v + rng.normal(0, 0.004) for v in u_curve]
    noisy[3] = noisy[9] - 0.02                              # one lucky evaluation, early
    assert abs(turning_epoch(epochs, noisy) - 9) <= 1
    assert int(np.argmin(noisy)) == 3                       # what the raw minimum would say
    # Never turns: the last epoch.
    assert turning_epoch(epochs, [2.0 - 0.01 * e for e in epochs]) == 40.0
    half_epochs = [e / 2 for e in range(21)]
    assert turning_epoch(half_epochs, [abs(e - 4.5) for e in half_epochs]) == 4.5
