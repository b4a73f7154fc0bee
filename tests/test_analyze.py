"""analyze.py: its Theorem 1 check against every gradient stacked, the paper's checkpoint rule, and
the figures and tables of a folder of runs, from synthetic run logs."""

import json

import numpy as np
import pytest
import torch

import analyze
from analyze import (accuracy_cell, accuracy_curve, accuracy_summary, domain_accuracy, exports,
                     gradient_variance)
from data.loader import read_windows
from dropout import gate
from entropy import build_entropy_cache, cache_header, load_entropy_cache
from evaluate import wilson_interval
from model import Transformer
# the fixture: a tiny base checkpoint and data folders
from test_train import workspace  # noqa: F401


def test_gradient_variance_equals_the_variance_of_stacked_gradients(workspace,  # noqa: F811
                                                                    tmp_path):
    seq_len, samples, seed, gammas = 32, 6, 1, [0.0, 0.5, 1.0]
    config = dict(init_from=str(workspace / "base"), target_data=str(workspace / "math"),
                  seq_len=seq_len, gate_percentile=0.5,
                  entropy_cache=str(tmp_path / "entropy.safetensors"))
    header = cache_header(config["init_from"], config["target_data"], seq_len)
    model = Transformer.from_pretrained(config["init_from"])
    build_entropy_cache(model.eval(), config["target_data"], seq_len, config["entropy_cache"],
                        header, batch_size=8)

    variances, alpha = gradient_variance(config, gammas, samples, seed=seed)

    # 15 of the 31 tokens that have an entropy (floor of 50%) are gated, out of 32 per window.
    assert alpha == 15 / 32
    # The same windows and mask draws, with every window's gradient kept and the variance taken
    # at once.
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


def test_the_fill_vector_report_averages_over_the_gated_tokens(workspace, tmp_path):  # noqa: F811
    """Appendix A.3's e_bar against the inputs it replaces, from per-token counts: the same numbers
    as the gated tokens' embeddings stacked one by one."""
    seq_len, cache = 32, tmp_path / "entropy.safetensors"
    config = dict(init_from=str(workspace / "base"), target_data=str(workspace / "math"),
                  seq_len=seq_len, gate_percentile=0.5, entropy_cache=str(cache))
    header = cache_header(config["init_from"], config["target_data"], seq_len)
    model = Transformer.from_pretrained(config["init_from"])
    build_entropy_cache(model.eval(), config["target_data"], seq_len, config["entropy_cache"],
                        header, batch_size=8)

    rows = [line.split(" | ") for line in analyze.fill_vector_report(config)[2].splitlines()[2:]]
    reported = [float(row[-1].rstrip(" |")) for row in rows]

    scores = load_entropy_cache(config["entropy_cache"], header, "")["train_entropy"][:, :seq_len]
    inputs = torch.from_numpy(read_windows(config["target_data"], "train", seq_len))[:, :seq_len]
    embeddings = model.embed_tokens.weight.detach().float()
    stacked = embeddings[inputs[gate(scores, 0.5, "low")]]  # (gated tokens, d)
    fill = embeddings.mean(dim=0)
    expected = [fill.norm(), embeddings.norm(dim=1).mean(), stacked.norm(dim=1).mean(),
                (stacked - fill).norm(dim=1).mean(), (fill - stacked.mean(0)).norm(),
                (stacked - stacked.mean(0)).norm(dim=1).pow(2).mean().sqrt()]
    assert reported == pytest.approx([round(float(x), 3) for x in expected], abs=1e-3)


def write_scores(folder, accuracies):
    """A scores.json as evaluate.py writes it: one finished entry per set."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"")
    entries = {name: {"partial": False, "accuracy": accuracy, "n": 10,
                      "correct": round(10 * accuracy),
                      "interval95": list(wilson_interval(round(10 * accuracy), 10)), "problems": []}
               for name, accuracy in accuracies.items()}
    (folder / "scores.json").write_text(json.dumps(entries))


def test_the_papers_rule_takes_the_export_with_the_highest_domain_average(tmp_path):
    """Table 1: "the checkpoint with the highest domain-average score", beside the best by loss."""
    run = {"folder": tmp_path / "run", "epoch": np.array([0.0, 1.0, 2.0, 3.0]),
           "val_loss": np.array([2.0, 1.5, 1.6, 1.9])}  # best by loss at epoch 1
    write_scores(run["folder"] / "best", {"math": 0.2, "code": 0.4})
    # average 0.4: the highest
    write_scores(run["folder"] / "epochs" / "2", {"math": 0.5, "code": 0.3})
    # average 0.4: a tie, later
    write_scores(run["folder"] / "epochs" / "3", {"math": 0.6, "code": 0.2})
    write_scores(run["folder"] / "epochs" / "1", {"math": 0.2, "code": 0.4})
    (run["folder"] / "epochs" / "10").mkdir()  # not scored, no weights
    chosen = accuracy_summary(run)
    assert chosen["highest"][0] == pytest.approx(0.4) and chosen["highest_epoch"] == 2.0
    assert chosen["best_by_loss"][0] == pytest.approx(0.3)
    assert chosen["final"][0] == pytest.approx(0.4)
    assert [epoch for epoch, _ in exports(run)] == [1.0, 2.0, 3.0]
    assert accuracy_curve([run], None) == [(1.0, pytest.approx(0.3)), (2.0, pytest.approx(0.4)),
                                           (3.0, pytest.approx(0.4))]
    assert accuracy_cell([domain_accuracy(run["folder"] / "best")]) == "30.0%"  # two sets: the mean
    write_scores(tmp_path / "one", {"math": 0.5})
    assert accuracy_cell([domain_accuracy(tmp_path / "one")]) == "50.0% (24%–76%, n = 10)"
    # A set scored on one export only does not decide: with physics, epoch 2 would average 0.53;
    # on the sets all exports share it has 0.35, and epoch 3 is the highest.
    write_scores(run["folder"] / "epochs" / "2", {"math": 0.5, "code": 0.2, "physics": 0.9})
    chosen = accuracy_summary(run)
    assert chosen["highest"][0] == pytest.approx(0.4) and chosen["highest_epoch"] == 3.0


# ---- the figures and tables of a folder of runs, from synthetic logs ---------------------------

def write_run(folder, seed=1, epochs=40, steps_per_epoch=17.5, turn=9.0, depth=0.0, accuracy=None,
              **config):
    """A finished run as analyze.py reads it: config.json, ckpt/ and a log.jsonl with one evaluation
    per target epoch of a U-shaped curve, lowest at epoch `turn`, `depth` below 1.0 there (plus
    0.001 per seed); accuracy(epoch) if given, else null as train.py logs it without problems."""
    config = {"seed": seed, "method": "baseline", "init_from": "scratch", "global_batch_size": 10,
              "seq_len": 256, "target_ratio": 0.6, "weight_decay": 0.0, "dropout": 0.0,
              "gamma_max": 0.4, **config}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "ckpt").mkdir()
    (folder / "ckpt" / "train_state.pt").write_bytes(b"")
    records = [{"kind": "config", **config}]
    for epoch in range(epochs + 1):
        loss = 1.0 - depth + 0.001 * seed + (epoch - turn) ** 2 / 400
        records.append({"kind": "eval", "step": round(epoch * steps_per_epoch),
                        "epoch": float(epoch), "val_loss": loss, "val_loss_low": 0.1,
                        "val_loss_high": 4 * loss - 1,
                        "general_val_loss": 0.9 + 0.001 * epoch,
                        "accuracy": accuracy(epoch) if accuracy else None})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_todays_study(root, seeds=(1, 2, 3)):
    """The settings that make reproduce ran before the sweeps, the repetitions and the long run."""
    for seed in seeds:
        write_run(root / "baseline" / f"seed{seed}", seed)
        write_run(root / "weight_decay" / f"seed{seed}", seed, method="weight_decay",
                  weight_decay=0.1)
        write_run(root / "hidden_dropout" / f"seed{seed}", seed, turn=30, depth=0.02,
                  method="hidden_dropout", dropout=0.1)
        write_run(root / "entrodrop" / f"seed{seed}", seed, turn=12, depth=0.005,
                  method="entrodrop")


def write_sweeps(root):
    """One seed of each new setting of the baselines' sweeps (Fig. 3)."""
    write_run(root / "weight_decay0.3" / "seed1", method="weight_decay", weight_decay=0.3,
              depth=0.01)
    write_run(root / "weight_decay0.5" / "seed1", method="weight_decay", weight_decay=0.5,
              depth=0.004)
    write_run(root / "hidden_dropout0.05" / "seed1", method="hidden_dropout", dropout=0.05,
              depth=0.01)


def write_repetitions(root, repeats=(1, 5, 10, 20)):
    """Fig. 1a's runs as make reproduce trains them: N epochs in 700 steps, target_ratio 0.015 N."""
    for n in repeats:
        write_run(root / f"repeat{n}" / "seed1", epochs=n, steps_per_epoch=700 / n,
                  target_ratio=0.015 * n)


def analyze_report(root):
    analyze.main([str(root), "--variance_samples", "0"])
    return (root / "results.md").read_text()


def test_the_best_of_each_sweep_stands_for_its_method(tmp_path):
    """Appendix A.2: the best setting of each tuned baseline goes into the main table (Fig. 3)."""
    write_todays_study(tmp_path)
    write_sweeps(tmp_path)
    groups = analyze.load_runs(tmp_path)

    assert analyze.family(groups, "weight_decay") == [
        (0.1, "weight_decay"), (0.3, "weight_decay0.3"), (0.5, "weight_decay0.5")]
    assert analyze.family(groups, "neftune") == []
    # Minima averaged over seeds: 1.002 (0.1), 0.991 (0.3), 0.997 (0.5).
    assert analyze.best_of_family(groups, "weight_decay") == "weight_decay0.3"
    # 0.982 (0.1, three seeds) against 0.991 (0.05, one seed).
    assert analyze.best_of_family(groups, "hidden_dropout") == "hidden_dropout"
    assert analyze.compared_methods(groups) == ["baseline", "weight_decay0.3", "hidden_dropout",
                                                "entrodrop"]
    assert analyze.group_label(groups, "weight_decay") == "weight decay 0.1"  # from config.json
    assert analyze.group_label(groups, "hidden_dropout0.05") == "hidden dropout 0.05"
    assert [run["config"]["seed"] for run in groups["baseline"]] == [1, 2, 3]


def test_repetitions_share_one_budget_and_the_baseline_joins_them_only_on_it(tmp_path):
    """Fig. 1a: N epochs of the target data in the same number of steps; a baseline of another
    length is not one of the points."""
    write_repetitions(tmp_path)
    write_run(tmp_path / "baseline" / "seed1")  # 40 epochs of 17.5 steps: the same 700 steps
    groups = analyze.load_runs(tmp_path)
    assert analyze.budget(groups["repeat1"][0]) == 700 * 10 * 256
    assert analyze.repetition_points(groups) == [(1.0, "repeat1"), (5.0, "repeat5"),
                                                 (10.0, "repeat10"), (20.0, "repeat20"),
                                                 (40.0, "baseline")]
    assert analyze.label("repeat5") == "target data repeated 5x"
    groups["baseline"][0]["step"][-1] += 1  # one step more: another budget
    assert analyze.repetition_points(groups)[-1] == (20.0, "repeat20")


def test_the_report_of_todays_study_has_no_sections_for_missing_runs(tmp_path):
    write_todays_study(tmp_path)
    report = analyze_report(tmp_path)
    assert "| weight decay 0.1 | 3 |" in report and "| EntroDrop | 3 |" in report
    for missing in ("Fig. 1a", "Fig. 1b", "Fig. 3", "Table 3", "Table 4: gamma_max"):
        assert missing not in report, missing
    figures = sorted(path.name for path in (tmp_path / "figures").iterdir())
    assert figures == ["fig1c.png", "fig2a.png", "fig4.png"]
    # Per seed: the seeds' minima at epoch 9, then (last two columns) the general loss at it and
    # at the last epoch.
    assert "| baseline | 1 / 2 / 3 | 1.001 / 1.002 / 1.003 | 9.0 / 9.0 / 9.0 |" in report
    assert "0.909 / 0.909 / 0.909 | 0.940 / 0.940 / 0.940 |" in report


def test_the_report_draws_the_sweeps_the_repetitions_and_the_long_horizon(tmp_path):
    write_todays_study(tmp_path)
    write_sweeps(tmp_path)
    write_repetitions(tmp_path)
    write_run(tmp_path / "baseline_long" / "seed1", epochs=120, accuracy=lambda epoch: epoch / 200)
    report = analyze_report(tmp_path)

    methods = report[report.index("## Methods"):report.index("## Fig. 1a")]
    assert "| weight decay 0.3 | 1 |" in methods and "| weight decay 0.1 |" not in methods
    assert "| hidden dropout 0.1 | 3 |" in methods
    assert "Fig. 3: the baselines' sweeps" in report and "| weight decay 0.1 | 3 |" in report
    # N = 10 ends its budget at epoch 10, the nearest to the turn at epoch 9: the lowest final loss.
    assert "lowest at N = 10." in report
    assert "| 1 | target data repeated 1x | 1 | 0.015 | 1,792,000 |" in report
    assert "| 40 | baseline | 3 |" in report
    assert "| baseline, long horizon | 1 |" in report
    for name in ("fig1a", "fig1b", "fig3"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 10_000, name
    groups = analyze.load_runs(tmp_path)
    assert groups["baseline_long"][0]["accuracy"][100] == pytest.approx(0.5)
    assert np.isnan(groups["baseline"][0]["accuracy"]).all()  # logged as null: not measured


# ---- Fig. 2c ------------------------------------------------------------------------------------

def test_text_on_each_box_is_black_or_white_whichever_contrasts_more():
    assert analyze.text_color((0.0, 0.0, 0.0)) == "white"
    assert analyze.text_color((1.0, 1.0, 1.0)) == "black"
    colormap = analyze.plt.get_cmap("magma_r")  # Fig. 2c's: light at low entropy, dark at high
    assert analyze.text_color(colormap(0.05)) == "black"
    assert analyze.text_color(colormap(0.95)) == "white"
    assert analyze.text_color((0.0, 0.0, 1.0)) == "white"  # pure blue is dark (luminance 0.07)
    assert analyze.text_color((1.0, 1.0, 0.0)) == "black"  # yellow is light (0.93)


def test_each_token_is_one_box_of_its_decoded_text():
    """A real tokenizer's tokens are whole words with their spaces; a newline in one ends a line."""
    pieces = ["Question", ":", " Priya", " sees", ".\nAnswer", ":", " 35", " dollars"]
    assert analyze.token_boxes(pieces, width=21) == [
        (0, 0, "Question", 0), (8, 0, ":", 1), (9, 0, " Priya", 2), (15, 0, " sees", 3),
        (20, 0, ".", 4), (0, 1, "Answer", 4), (6, 1, ":", 5), (7, 1, " 35", 6),
        (10, 1, " dollars", 7)]
    # A byte-level model's tokens are characters: lines still break between words.
    assert analyze.token_boxes(list("Each full box"), width=8) == [
        (0, 0, "E", 0), (1, 0, "a", 1), (2, 0, "c", 2), (3, 0, "h", 3), (4, 0, " ", 4),
        (0, 1, "f", 5), (1, 1, "u", 6), (2, 1, "l", 7), (3, 1, "l", 8), (4, 1, " ", 9),
        (5, 1, "b", 10), (6, 1, "o", 11), (7, 1, "x", 12)]
    # A word longer than a line breaks between its tokens.
    assert analyze.token_boxes(["a" * 15, "b" * 10, " c"], width=20) == [
        (0, 0, "a" * 15, 0), (0, 1, "b" * 10, 1), (10, 1, " c", 2)]


def test_the_report_compares_online_scores_and_automatic_midpoints(tmp_path):
    """Beyond the paper: each run's j0 comes from its curriculum record (auto:, patience:) or its
    setting; a patience run that never found one says so."""
    write_todays_study(tmp_path, seeds=(1,))
    write_run(tmp_path / "entrodrop_online" / "seed1", turn=14, depth=0.006, method="entrodrop",
              score_source="online", curriculum_midpoint=9.0)
    for name, midpoint in (("entrodrop_auto_j0", 8.5), ("entrodrop_patience", None)):
        folder = tmp_path / name / "seed1"
        write_run(folder, turn=12, method="entrodrop", curriculum_midpoint=f"{name[10:]}:x")
        if midpoint is not None:
            with open(folder / "log.jsonl", "a") as log:
                log.write(json.dumps({"kind": "curriculum", "midpoint": midpoint}) + "\n")
    report = analyze_report(tmp_path)
    section = report[report.index("## Beyond the paper"):]
    assert "| EntroDrop, online entropy | 1 | 0.995 | 14.0 |" in section
    assert "EntroDrop, online entropy: 9.00" in section
    assert "EntroDrop, j0 read off the baseline (auto:): 8.50" in section
    assert "EntroDrop, j0 by patience (no baseline): none found" in section
    assert (tmp_path / "figures" / "beyond.png").exists()


def test_scored_exports_add_accuracy_to_the_tables_and_beside_the_loss(tmp_path, monkeypatch):
    """With scores.json beside the exports (evaluate.py), the tables gain the accuracy of the
    highest export, the report its accuracy section (a model trained from scratch too), and
    Figs. 1b, 2a and 2b the accuracy of each export: beside the loss, or on a second axis for the
    long horizon."""
    write_todays_study(tmp_path, seeds=(1,))
    write_run(tmp_path / "baseline_long" / "seed1", epochs=120)
    write_run(tmp_path / "entrodrop_fixed" / "seed1", turn=10, method="entrodrop",
              curriculum="constant")
    # The accuracy of the exports at epochs 10 and 20; best/ (epoch 9 to 12) scores as epoch 10.
    accuracies = {"baseline": (0.3, 0.2), "weight_decay": (0.2, 0.4), "hidden_dropout": (0.4, 0.5),
                  "entrodrop": (0.5, 0.7), "baseline_long": (0.3, 0.1),
                  "entrodrop_fixed": (0.4, 0.4)}
    for name, (at_10, at_20) in accuracies.items():
        run = tmp_path / name / "seed1"
        write_scores(run / "epochs" / "10", {"math": at_10})
        write_scores(run / "epochs" / "20", {"math": at_20})
        write_scores(run / "best", {"math": at_10})
    drawn = {}  # figure -> {y label: [the y values of each line]}
    real_savefig = analyze.plt.Figure.savefig

    def record(figure, path, **settings):
        drawn[path.name] = {ax.get_ylabel(): [list(line.get_ydata()) for line in ax.get_lines()]
                            for ax in figure.axes}
        real_savefig(figure, path, **settings)

    monkeypatch.setattr(analyze.plt.Figure, "savefig", record)
    report = analyze_report(tmp_path)

    def row(section, name):
        part = report[report.index(section):]
        return next(line for line in part.splitlines() if line.startswith(f"| {name} |"))

    # One seed, one set of 10 problems: the accuracy and its 95% Wilson interval.
    cells = {0.2: "20.0% (6%–51%, n = 10)", 0.3: "30.0% (11%–60%, n = 10)",
             0.4: "40.0% (17%–69%, n = 10)", 0.5: "50.0% (24%–76%, n = 10)",
             0.7: "70.0% (40%–89%, n = 10)"}
    assert row("## Methods", "method").endswith("| accuracy (highest export) |")
    for name, highest in (("baseline", 0.3), ("weight decay 0.1", 0.4),
                          ("hidden dropout 0.1", 0.5), ("EntroDrop", 0.7)):
        assert row("## Methods", name).endswith(f"| {cells[highest]} |"), name
    assert row("## Fig. 1b", "baseline, long horizon").endswith(f"| {cells[0.3]} |")
    assert row("## Curriculum vs fixed ratio", "EntroDrop, fixed ratio").endswith(
        f"| {cells[0.4]} |")
    # Best by loss, final, highest over the exports and its epoch (the earliest on a tie).
    assert row("## Answer accuracy", "baseline") == \
        f"| baseline | {cells[0.3]} | {cells[0.2]} | {cells[0.3]} | 9.0 |"
    assert row("## Answer accuracy", "weight decay 0.1") == \
        f"| weight decay 0.1 | {cells[0.2]} | {cells[0.4]} | {cells[0.4]} | 20.0 |"
    assert drawn["fig2a.png"]["answer accuracy"] == [[0.3, 0.2], [0.2, 0.4], [0.4, 0.5],
                                                     [0.5, 0.7]]
    assert drawn["fig2b.png"]["answer accuracy"] == [[0.3, 0.2], [0.5, 0.7], [0.4, 0.4]]
    assert drawn["fig1b.png"]["answer accuracy"] == [[0.3, 0.1]]
    assert "target validation loss (nats/token)" in drawn["fig1b.png"]
