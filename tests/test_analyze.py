"""analyze.py's Theorem 1 check: the running variance it keeps against every gradient stacked."""

import numpy as np
import pytest
import torch

from analyze import gradient_variance
from data.loader import read_windows
from dropout import gate
from entropy import build_entropy_cache, cache_header, load_entropy_cache
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
