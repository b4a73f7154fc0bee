"""The gate's scores: aligned to the right input positions through the real training path, and
refreshed online from the training pass (score_source="online"); and the curriculum's midpoint
found during the run (curriculum_midpoint="patience:P")."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import train
from dropout import refresh_scores, row_scores
from model import Transformer
from schedule import turn_by_patience
from tokenizer import load_tokenizer
# workspace: the shared fixture
from test_train import TINY, args_for, records, run, workspace  # noqa: F401


def brute_force_entropy(logits):
    p = torch.softmax(logits.double(), dim=-1)
    return -(p * p.log()).sum(-1)


def test_filled_inputs_are_the_lowest_entropy_tokens_of_their_window(workspace, tmp_path,
                                                                      monkeypatch):
    """Every input position that gets the fill holds a token whose base-model entropy (predicting
    it from the tokens before it, by transformers) is among the lowest half of its window's. Gating
    x_t by the entropy of x_(t+1) instead would fail this."""
    seen = []
    forward = Transformer.forward

    def spy(self, idx, targets=None, fill_mask=None, **kwargs):
        if fill_mask is not None and fill_mask.any():
            seen.append((idx.clone(), fill_mask.clone()))
        return forward(self, idx, targets, fill_mask, **kwargs)

    # A random model's entropies all sit near log(vocab); larger embeddings (tied to the head)
    # spread them over several nats, far beyond the float16 resolution of the entropy cache
    # (0.004 at 5).
    base = tmp_path / "base"
    torch.manual_seed(0)
    model = Transformer(TINY)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(8)
    model.save_pretrained(base)
    load_tokenizer("byte").save(base)
    monkeypatch.setattr(Transformer, "forward", spy)
    train.main(args_for(workspace, tmp_path / "run", method="entrodrop", max_steps=6, gamma_max=0.9,
                        curriculum_midpoint=-20.0, eval_interval=0, init_from=base,
                        entropy_cache=tmp_path / "entropy.safetensors"))
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    checked = 0
    for idx, fill_mask in seen:
        with torch.no_grad():
            # (b, T): position j predicts x_(j+1)
            entropy = brute_force_entropy(reference(idx).logits)
        scores = torch.cat((torch.full((len(idx), 1), math.nan, dtype=torch.float64),
                            entropy[:, :-1]), dim=1)
        for row_scores_, row_mask in zip(scores, fill_mask):
            if not row_mask.any():
                continue
            scored = row_scores_[1:]
            # The score of the gate's last eligible token.
            threshold = scored.sort().values[math.floor(0.5 * len(scored)) - 1]
            assert not row_mask[0] and (row_scores_[row_mask] <= threshold + 5e-3).all()
            checked += int(row_mask.sum())
    assert checked > 50


def test_row_scores_align_windows_and_skip_general_rows():
    scores = torch.arange(12, dtype=torch.float32).view(3, 4)       # 3 windows, seq_len 3
    rows = row_scores(scores, torch.tensor([2, -1, 0]), torch.tensor([True, False, True]), 3)
    assert torch.equal(rows[0], scores[2, :3])
    assert rows[1].isnan().all()
    assert torch.equal(rows[2], scores[0, :3])


def test_online_entropies_equal_a_separate_forward_pass():
    """The training pass's by-product against a second pass on the same (filled) inputs, and
    against a brute-force softmax of the logits."""
    torch.manual_seed(0)
    model = Transformer(TINY)
    model.fill_embedding.copy_(model.embed_tokens.weight.mean(0))
    idx, targets = torch.randint(0, TINY.vocab_size, (2, 3, 40)).unbind(0)
    fill_mask = torch.rand(3, 40) < 0.3
    entropy, loss = model(idx, targets, fill_mask=fill_mask, with_entropy=True)
    loss.backward()
    with torch.no_grad():
        separate, _ = model(idx, targets, fill_mask=fill_mask, per_token=True)
        logits = model(idx, fill_mask=fill_mask)
    assert (entropy - separate).abs().max() <= 1e-4
    assert (entropy.double() - brute_force_entropy(logits)).abs().max() <= 1e-4
    _, plain_loss = model(idx, targets, fill_mask=fill_mask)
    assert torch.equal(loss, plain_loss)


def test_refresh_keeps_the_score_after_a_filled_input():
    scores = torch.full((4, 6), 9.0)
    scores[:, 0] = math.nan
    entropy = torch.arange(10, dtype=torch.float32).view(2, 5)  # position j scores x_(j+1)
    fill_mask = torch.tensor([[False, True, False, False, False], [False] * 5])
    refresh_scores(scores, torch.tensor([3, -1]), entropy, fill_mask)
    # x_2 follows a filled x_1.
    assert torch.equal(scores[3, 1:], torch.tensor([0.0, 9.0, 2.0, 3.0, 4.0]))
    assert scores[3, 0].isnan()
    assert (scores[:3, 1:] == 9.0).all()  # general rows: untouched


def test_online_scores_change_the_gate_and_travel_with_the_checkpoint(workspace, tmp_path):
    settings = dict(method="entrodrop", max_steps=12, eval_interval=6, score_source="online")
    train.main(args_for(workspace, tmp_path / "online", **settings))
    train.main(args_for(workspace, tmp_path / "static", **{**settings, "score_source": "static"}))
    state = train.read_train_state(tmp_path / "online" / "ckpt")
    static = state["online_scores"]
    assert state["online_scores"] is not None and records(tmp_path / "static", "train") != \
        records(tmp_path / "online", "train")
    assert train.read_train_state(tmp_path / "static" / "ckpt")["online_scores"] is None
    assert torch.isnan(static[:, 0]).all() and not torch.isnan(static[:, 1:]).any()
    guard_message = "score_source='online' refreshes entropies that gate tokens"
    result = run(args_for(workspace, tmp_path / "bad", method="baseline", score_source="online"),
                 check=False)
    assert result.returncode == 1 and guard_message in result.stderr


def test_turn_by_patience_on_synthetic_curves():
    epochs = [float(e) for e in range(16)]
    u_curve = [1.0 + 0.01 * (e - 9) ** 2 for e in epochs]
    assert [turn_by_patience(epochs[:n], u_curve[:n], 2) for n in (10, 11, 12, 13)] == \
        [None, None, 9.0, 9.0]
    assert turn_by_patience(epochs, [1.0 - 0.01 * e for e in epochs], 2) is None  # still improving
    assert turn_by_patience([], [], 1) is None


def test_patience_midpoint_starts_the_curriculum_when_the_run_turns(workspace, tmp_path):
    out = tmp_path / "run"
    train.main(args_for(workspace, out, method="entrodrop", epochs=6.0, eval_interval=5,
                        learning_rate=3e-2, min_lr=3e-2, curriculum_midpoint="patience:2"))
    evals = records(out, "eval")
    found = records(out, "curriculum")
    assert len(found) == 1, [round(r["val_loss"], 4) for r in evals]
    midpoint, found_at = found[0]["midpoint"], found[0]["found_at_epoch"]
    upto = [r for r in evals if r["epoch"] <= found_at]
    assert midpoint == turn_by_patience([r["epoch"] for r in upto],
                                        [r["val_loss"] for r in upto], 2)
    steps = records(out, "train")
    found_step = next(r["step"] for r in evals if r["epoch"] == found_at)
    assert all(r["gamma_max_j"] == 0.0 for r in steps if r["step"] <= found_step)
    before = {r["step"]: r for r in steps}
    for r in steps:
        if r["step"] > found_step + 1:  # a step's ceiling uses the epoch it starts at
            expected = 0.5 / (1 + math.exp(-(before[r["step"] - 1]["epoch"] - midpoint)))  # Eq. (4)
            assert r["gamma_max_j"] == pytest.approx(expected)
