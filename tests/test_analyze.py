"""analyze.py's Theorem 1 check: the running variance it keeps against every gradient stacked."""

import json

import numpy as np
import pytest
import torch

from analyze import accuracy_cell, accuracy_curve, accuracy_summary, domain_accuracy, exports, gradient_variance
from data.loader import read_windows
from dropout import gate
from entropy import build_entropy_cache, cache_header, load_entropy_cache
from evaluate import wilson_interval
from model import Transformer
from test_train import workspace  # noqa: F401 (the fixture: a tiny base checkpoint and data folders)


def test_gradient_variance_equals_the_variance_of_stacked_gradients(workspace, tmp_path):  # noqa: F811
    seq_len, samples, seed, gammas = 32, 6, 1, [0.0, 0.5, 1.0]
    config = dict(init_from=str(workspace / "base"), target_data=str(workspace / "math"), seq_len=seq_len,
                  gate_percentile=0.5, entropy_cache=str(tmp_path / "entropy.safetensors"))
    header = cache_header(config["init_from"], config["target_data"], seq_len)
    model = Transformer.from_pretrained(config["init_from"])
    build_entropy_cache(model.eval(), config["target_data"], seq_len, config["entropy_cache"], header, batch_size=8)

    variances, alpha = gradient_variance(config, gammas, samples, seed=seed)

    # 15 of the 31 tokens that have an entropy (floor of 50%) are gated, out of 32 per window.
    assert alpha == 15 / 32
    # The same windows and mask draws, with every window's gradient kept and the variance taken at once.
    scores = load_entropy_cache(config["entropy_cache"], header, "")["train_entropy"]
    indices = np.random.default_rng(seed).permutation(len(scores))[:samples]
    windows = torch.from_numpy(read_windows(config["target_data"], "train", seq_len, indices))
    eligible = gate(scores[indices, :seq_len], 0.5, "low")
    generator = torch.Generator().manual_seed(seed)
    for gamma, variance in zip(gammas, variances):
        gradients = []
        for i in range(samples):
            mask = eligible[i:i + 1] & (torch.rand(1, seq_len, generator=generator) < gamma)
            model.zero_grad()
            model(windows[i:i + 1, :-1], windows[i:i + 1, 1:], fill_mask=mask)[1].backward()
            gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
        g = torch.stack(gradients)  # (samples, parameters)
        assert variance == pytest.approx(((g - g.mean(0)) ** 2).sum(1).mean().item(), rel=1e-9)
    assert len(set(variances)) == len(gammas)  # the masks change the gradients


def write_scores(folder, accuracies):
    """A scores.json as evaluate.py writes it: one finished entry per set."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"")
    entries = {name: {"partial": False, "accuracy": accuracy, "n": 10, "correct": round(10 * accuracy),
                      "interval95": list(wilson_interval(round(10 * accuracy), 10)), "problems": []}
               for name, accuracy in accuracies.items()}
    (folder / "scores.json").write_text(json.dumps(entries))


def test_the_papers_rule_takes_the_export_with_the_highest_domain_average(tmp_path):
    """Table 1: "the checkpoint with the highest domain-average score", beside the best by loss."""
    run = {"folder": tmp_path / "run", "epoch": np.array([0.0, 1.0, 2.0, 3.0]),
           "val_loss": np.array([2.0, 1.5, 1.6, 1.9])}  # best by loss at epoch 1
    write_scores(run["folder"] / "best", {"math": 0.2, "code": 0.4})
    write_scores(run["folder"] / "epochs" / "2", {"math": 0.5, "code": 0.3})   # average 0.4: the highest
    write_scores(run["folder"] / "epochs" / "3", {"math": 0.6, "code": 0.2})   # average 0.4: a tie, later
    write_scores(run["folder"] / "epochs" / "1", {"math": 0.2, "code": 0.4})
    (run["folder"] / "epochs" / "10").mkdir()                                  # not scored, no weights
    chosen = accuracy_summary(run)
    assert chosen["highest"][0] == pytest.approx(0.4) and chosen["highest_epoch"] == 2.0
    assert chosen["best_by_loss"][0] == pytest.approx(0.3) and chosen["final"][0] == pytest.approx(0.4)
    assert [epoch for epoch, _ in exports(run)] == [1.0, 2.0, 3.0]
    assert accuracy_curve([run], None) == [(1.0, pytest.approx(0.3)), (2.0, pytest.approx(0.4)),
                                           (3.0, pytest.approx(0.4))]
    assert accuracy_cell([domain_accuracy(run["folder"] / "best")]) == "30.0%"  # two sets: their mean
    write_scores(tmp_path / "one", {"math": 0.5})
    assert accuracy_cell([domain_accuracy(tmp_path / "one")]) == "50.0% (24%–76%, n = 10)"
