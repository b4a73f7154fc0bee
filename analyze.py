"""
Figures and tables of the paper's findings, from training logs and entropy caches alone (it never
trains; the gradient-variance check only runs forward and backward passes of a saved checkpoint).

    python analyze.py out/demo          # writes out/demo/figures/*.png and out/demo/results.md

A run is a folder holding log.jsonl and config.json (what train.py writes). Runs are grouped by
their folder's name; several seeds of one setting live in <name>/seed<k>/ and are shown as
mean +- std. The names this script knows (each figure or table uses those that are present, and
skips those whose runs are missing):
    baseline, weight_decay, hidden_dropout, neftune, token_dropout, entrodrop    (Fig. 2a)
    weight_decay<d>, hidden_dropout<p>   the baselines' sweeps, weight_decay=<d> / dropout=<p>
                                         (Fig. 3); the best of each family stands for its method
                                         in Fig. 2a and the methods table (Appendix A.2)
    repeat<N>                            the baseline with the target data repeated N times within
                                         the baseline's token budget (Fig. 1a)
    baseline_long                        the baseline trained for many more epochs (Fig. 1b)
    entrodrop_fixed                      curriculum="constant"                   (Fig. 2b)
    entrodrop_midpoint<j>                curriculum_midpoint=<j>                 (Fig. 2b)
    entrodrop_high, entrodrop_random     targeting="high" / "random"             (Table 3)
    entrodrop_gamma<g>                   gamma_max=<g>                           (Table 4)
    entrodrop_zero_fill                  fill="zero"                             (Appendix A.3)

Figures: Fig. 1a (loss against the number of repetitions in a fixed budget), Fig. 1b (the long
horizon), Fig. 1c (baseline loss of low- vs high-entropy tokens), Fig. 2a (every method), Fig. 2b
(curriculum vs fixed ratio), Fig. 2c (a validation problem shaded by base-model entropy), Fig. 3
(the baselines' sweeps), Fig. 4 (entropy-group dynamics, baseline vs EntroDrop), and the Theorem 1
check (gradient variance against the masking rate gamma * alpha).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from checkpoint import load_training_state  # noqa: E402
from data.loader import read_windows  # noqa: E402
from dropout import gate  # noqa: E402
from entropy import cache_header, default_cache_path, load_entropy_cache  # noqa: E402
from model import Transformer  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

METHODS = {"baseline": "baseline", "weight_decay": "weight decay",
           "hidden_dropout": "hidden dropout", "neftune": "NEFTune",
           "token_dropout": "token dropout (all tokens)", "entrodrop": "EntroDrop"}
ABLATIONS = {"entrodrop_fixed": "EntroDrop, fixed ratio",
             "entrodrop_high": "EntroDrop targeting high entropy",
             "entrodrop_random": "EntroDrop targeting a random share",
             "entrodrop_zero_fill": "EntroDrop, zero fill",
             "baseline_long": "baseline, long horizon"}
# Beyond the paper: the gate's scores refreshed during training; j0 found without reading a curve.
BEYOND = {"entrodrop_online": "EntroDrop, online entropy",
          "entrodrop_auto_j0": "EntroDrop, j0 read off the baseline (auto:)",
          "entrodrop_patience": "EntroDrop, j0 by patience (no baseline)"}
SWEEPS = {"gamma": "gamma_max", "midpoint": "midpoint j0 ="}  # entrodrop_<sweep><value>
# The baselines tuned in Appendix A.2 (Fig. 3), each with the config key that its sweep varies.
FAMILIES = {"weight_decay": "weight_decay", "hidden_dropout": "dropout"}
CURVES = ("val_loss", "val_loss_low", "val_loss_high", "general_val_loss", "accuracy")


def label(name, config=None):
    """How a setting is named in tables and legends; a swept baseline with its value, read from a
    run's config when the folder name does not carry it."""
    swept = re.fullmatch(r"entrodrop_(gamma|midpoint)([\d.]+)", name)
    if swept:
        return f"EntroDrop, {SWEEPS[swept[1]]} {swept[2]}"
    repeated = re.fullmatch(r"repeat([\d.]+)", name)
    if repeated:
        return f"target data repeated {repeated[1]}x"
    member = re.fullmatch(rf"({'|'.join(FAMILIES)})([\d.]*)", name)
    if member and (member[2] or config):
        return f"{METHODS[member[1]]} {member[2] or format(config[FAMILIES[member[1]]], 'g')}"
    return METHODS.get(name) or ABLATIONS.get(name) or BEYOND.get(name) or name


def group_label(groups, name):
    return label(name, groups[name][0]["config"])


# ---- reading runs ------------------------------------------------------------------------

def load_runs(root):
    """{group name: [run, ...]} with the runs of a group in seed order, a run being {"config",
    "folder", "step" (n,), "epoch" (n,), curve name: (n,)} of its evaluations (NaN where a curve
    was not measured, as accuracy in most runs)."""
    groups = {}
    for log in sorted(Path(root).rglob("log.jsonl")):
        folder = log.parent
        name = folder.parent.name if re.fullmatch(r"seed\d+", folder.name) else folder.name
        evals = [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "eval"]
        config = json.loads((folder / "config.json").read_text())
        if not evals or not (folder / "ckpt" / "train_state.pt").exists():
            continue
        run = {"config": config, "folder": folder, "step": np.array([r["step"] for r in evals]),
               "epoch": np.array([r["epoch"] for r in evals])}
        for key in CURVES:
            run[key] = np.array([np.nan if r.get(key) is None else r[key] for r in evals])
        groups.setdefault(name, []).append(run)
    for runs in groups.values():
        runs.sort(key=lambda run: run["config"]["seed"])
    return groups


def budget(run):
    """Tokens a run trained on, target and general together: its last step's global batches."""
    return int(run["step"][-1]) * run["config"]["global_batch_size"] * run["config"]["seq_len"]


def summary(run):
    """What Table 4 reports, and more: the minimum target validation loss, its epoch, the
    rebound."""
    best = int(np.nanargmin(run["val_loss"]))
    return {"min_val_loss": run["val_loss"][best], "best_epoch": run["epoch"][best],
            "final_val_loss": run["val_loss"][-1],
            "rise": run["val_loss"][-1] / run["val_loss"][best] - 1,
            "low_at_best": run["val_loss_low"][best], "low_final": run["val_loss_low"][-1],
            "high_at_best": run["val_loss_high"][best], "high_final": run["val_loss_high"][-1],
            "general_at_best": run["general_val_loss"][best],
            "general_final": run["general_val_loss"][-1]}


def mean_minimum(runs):
    """The minimum target validation loss of a setting, averaged over its seeds."""
    return float(np.mean([summary(run)["min_val_loss"] for run in runs]))


def family(groups, method):
    """Fig. 3: [(value, name)] of a baseline's sweep in value order: the settings named <method> or
    <method><value> (weight_decay0.3), valued by the config key that the sweep varies."""
    members = [name for name in groups if re.fullmatch(rf"{method}[\d.]*", name)]
    return sorted((groups[name][0]["config"][FAMILIES[method]], name) for name in members)


def best_of_family(groups, method):
    """Appendix A.2: "the best-performing configuration for each method is reported in the main
    results table". Best here: the lowest minimum target validation loss, averaged over seeds."""
    names = [name for _, name in family(groups, method)]
    return min(names, key=lambda name: mean_minimum(groups[name]))


def compared_methods(groups):
    """The setting that stands for each method of Fig. 2a and the methods table, in METHODS order:
    a swept baseline by the best of its family, every other method by its own run."""
    names = []
    for method in METHODS:
        if method in FAMILIES and family(groups, method):
            names.append(best_of_family(groups, method))
        elif method in groups:
            names.append(method)
    return names


def domain_accuracy(folder, names=None):
    """A checkpoint's accuracy averaged over the sets evaluate.py scored it on (the paper's domain
    average), only those in `names` if given, and those sets' scores; None if none is finished."""
    path = Path(folder) / "scores.json"
    every_set = json.loads(path.read_text()) if path.is_file() else {}
    sets = [s for name, s in every_set.items()
            if not s["partial"] and (names is None or name in names)]
    return (float(np.mean([s["accuracy"] for s in sets])), sets) if sets else None


def run_set_names(runs):
    """The names of the sets the runs' exports were scored on: the base model, shared by studies on
    other sets, is averaged over these alone."""
    names = set()
    for run in runs:
        for _, folder in [*exports(run), (None, run["folder"] / "best")]:
            if (folder / "scores.json").is_file():
                names |= set(json.loads((folder / "scores.json").read_text()))
    return names


def exports(run):
    """[(epoch, folder)] of a run's epochs/<epoch>/ exports, in epoch order."""
    folders = [p for p in (run["folder"] / "epochs").glob("*")
               if (p / "model.safetensors").is_file()
               or (p / "model.safetensors.index.json").is_file()]
    return sorted((float(p.name), p) for p in folders)


def finished_sets(folder):
    """The names of the sets whose scoring a checkpoint's scores.json holds whole."""
    path = Path(folder) / "scores.json"
    every_set = json.loads(path.read_text()) if path.is_file() else {}
    return {name for name, scores in every_set.items() if not scores["partial"]}


def accuracy_summary(run):
    """Accuracy of the best export by validation loss, of the final one, and Table 1's rule: the
    export with the highest domain-average accuracy ("the checkpoint with the highest
    domain-average score"; the earliest on a tie), averaged over the sets that every scored export
    has finished, so that a set scored on some exports only cannot decide. Each value is
    (accuracy, sets) or None."""
    best_epoch = float(run["epoch"][int(np.nanargmin(run["val_loss"]))])
    candidates = [*exports(run), (best_epoch, run["folder"] / "best")]
    finished = [names for names in (finished_sets(folder) for _, folder in candidates) if names]
    common = set.intersection(*finished) if finished else set()
    scored = [(accuracy, epoch) for epoch, folder in candidates
              if (accuracy := domain_accuracy(folder, common))]
    chosen = max(scored, key=lambda item: (item[0][0], -item[1])) if scored else (None, None)
    return {"best_by_loss": domain_accuracy(run["folder"] / "best"),
            "final": domain_accuracy(exports(run)[-1][1]) if exports(run) else None,
            "highest": chosen[0], "highest_epoch": chosen[1]}


def accuracy_cell(results):
    """Mean accuracy over seeds; with one seed and one set, its 95% interval and size."""
    results = [r for r in results if r is not None]
    if not results:
        return "–"
    if len(results) == 1 and len(results[0][1]) == 1:
        scores = results[0][1][0]
        low, high = scores["interval95"]
        return f"{scores['accuracy']:.1%} ({low:.0%}–{high:.0%}, n = {scores['n']})"
    return mean_std([accuracy for accuracy, _ in results], digits=1, percent=True)


def accuracy_section(groups, names, base_folder):
    rows = []
    for name in names:
        summaries = [accuracy_summary(run) for run in groups[name]]
        epochs = [s["highest_epoch"] for s in summaries if s["highest_epoch"] is not None]
        cells = [accuracy_cell([s[key] for s in summaries]) for key in ("best_by_loss", "final",
                                                                       "highest")]
        rows.append([group_label(groups, name), *cells,
                     mean_std(epochs, digits=1) if epochs else "–"])
    if all(cell == "–" for row in rows for cell in row[1:]):
        return []
    names_scored = run_set_names([run for name in names for run in groups[name]])
    rows.insert(0, ["base model", accuracy_cell([domain_accuracy(base_folder, names_scored)]),
                    "", "", ""])
    return ["## Answer accuracy (greedy decoding, held-out problems)", "",
            "From scores.json beside each export (evaluate.py), averaged over its sets: the export "
            "that is best by target validation loss, the final one, and the one with the highest "
            "accuracy (the paper's rule, Table 1), with its epoch. One seed: 95% Wilson interval "
            "and the number of problems in brackets.", "",
            table(["model", "best by val loss", "final", "highest over exports", "its epoch"],
                  rows), ""]


def mean_std(values, digits=3, percent=False):
    values = np.array(values, dtype=float) * (100 if percent else 1)
    unit = "%" if percent else ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}{unit}"


# ---- figures -----------------------------------------------------------------------------

def plot_curves(ax, runs, key, name, color=None, style="-"):
    """Mean over seeds (shaded +- std) of one curve against target epochs."""
    n = min(len(r[key]) for r in runs)
    x = runs[0]["epoch"][:n]
    values = np.stack([r[key][:n] for r in runs])
    mean = values.mean(axis=0)
    line, = ax.plot(x, mean, style, color=color, label=name, lw=1.6)
    if len(runs) > 1:
        ax.fill_between(x, mean - values.std(axis=0, ddof=1), mean + values.std(axis=0, ddof=1),
                        color=line.get_color(), alpha=0.2)


def figure_methods(groups, names, title, path, base_folder=None):
    """Target validation loss against epochs; beside it, when exports were scored, the accuracy of
    each export (mean over seeds), starting from the base model's at epoch 0, as the paper draws
    it."""
    points = {name: accuracy_curve(groups[name], base_folder) for name in names}
    with_accuracy = any(len(curve) > 1 for curve in points.values())
    fig, axes = plt.subplots(1, 2 if with_accuracy else 1,
                             figsize=(12 if with_accuracy else 7, 4.2), squeeze=False)
    for name in names:
        plot_curves(axes[0, 0], groups[name], "val_loss", group_label(groups, name))
    axes[0, 0].set(xlabel="target epoch", ylabel="target validation loss (nats/token)", title=title)
    axes[0, 0].legend()
    if with_accuracy:
        for name, curve in points.items():
            axes[0, 1].plot(*zip(*curve), "o-", label=group_label(groups, name), lw=1.6)
        axes[0, 1].set(xlabel="target epoch", ylabel="answer accuracy",
                       title="accuracy of each export")
        axes[0, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def accuracy_curve(runs, base_folder):
    """[(epoch, accuracy)]: the base model's at 0, then each export epoch scored in every seed
    (mean)."""
    base = domain_accuracy(base_folder, run_set_names(runs)) if base_folder else None
    by_epoch = {}
    for run in runs:
        for epoch, folder in exports(run):
            scored = domain_accuracy(folder)
            if scored:
                by_epoch.setdefault(epoch, []).append(scored[0])
    curve = [(epoch, float(np.mean(values))) for epoch, values in sorted(by_epoch.items())
             if len(values) == len(runs)]
    return ([(0.0, base[0])] if base else []) + curve


def figure_groups(groups, names, title, path):
    """Loss of the base model's low-entropy (50% most confident) and high-entropy (25% least
    confident) validation tokens, per epoch: Fig. 1c for the baseline, Fig. 4 against EntroDrop."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in zip(names, ("-", "--")):
        for ax, key in zip(axes, ("val_loss_low", "val_loss_high")):
            plot_curves(ax, groups[name], key, group_label(groups, name),
                        color="tab:blue" if key.endswith("low") else "tab:red", style=style)
    for ax, group in zip(axes, ("low-entropy tokens (50% most confident)",
                                "high-entropy tokens (25% least confident)")):
        ax.set(xlabel="target epoch", ylabel="validation loss (nats/token)", title=group)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def figure_sweeps(groups, methods, path):
    """Fig. 3: each tuned baseline's sweep (Appendix A.2), one panel per method: target validation
    loss against epochs for every value, the untuned baseline dashed."""
    fig, axes = plt.subplots(1, len(methods), figsize=(6.5 * len(methods), 4.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        plot_curves(ax, groups["baseline"], "val_loss", "baseline", color="tab:gray", style="--")
        for _, name in family(groups, method):
            plot_curves(ax, groups[name], "val_loss", group_label(groups, name))
        best = groups[best_of_family(groups, method)][0]["config"][FAMILIES[method]]
        ax.set(xlabel="target epoch", ylabel="target validation loss (nats/token)",
               title=f"{METHODS[method]} (best: {best:g})")
        ax.legend()
    fig.suptitle("Fig. 3: the baselines' sweeps")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def repetition_points(groups):
    """Fig. 1a: [(N, name)] of the settings that repeat the target data N times within one token
    budget, in order of N: the repeat<N> runs, and the baseline when it trained on their budget.
    N is the number of target epochs done at the end, averaged over seeds."""
    names = [name for name in groups if re.fullmatch(r"repeat[\d.]+", name)]
    budgets = {budget(run) for name in names for run in groups[name]}
    if names and "baseline" in groups and {budget(run) for run in groups["baseline"]} <= budgets:
        names.append("baseline")
    repeats = {name: float(np.mean([run["epoch"][-1] for run in groups[name]])) for name in names}
    return sorted((n, name) for name, n in repeats.items())


def figure_repetition(groups, points, path):
    """Fig. 1a in miniature: with the token budget fixed, target validation loss at the end of the
    budget (and the lowest along the way) against how often the target data was repeated, and the
    general validation loss, as the general data takes the rest of the budget (Sec. 2, RQ1)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    repeats = [n for n, _ in points]
    panels = {"target": {"final_val_loss": "at the end of the budget",
                         "min_val_loss": "lowest along the way"},
              "general": {"general_final": "at the end of the budget"}}
    for ax, (domain, curves) in zip(axes, panels.items()):
        for key, curve_label in curves.items():
            values = [[summary(run)[key] for run in groups[name]] for _, name in points]
            errors = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(repeats, [np.mean(v) for v in values], yerr=errors, fmt="o-", capsize=3,
                        label=curve_label)
        ax.set_xscale("log")
        ax.set_xticks(repeats, [f"{n:g}" for n in repeats])
        ax.set(xlabel="target epochs N in the same token budget",
               ylabel=f"{domain} validation loss (nats/token)", title=f"{domain} domain")
        ax.legend()
    fig.suptitle("Fig. 1a: a fixed token budget, the target data repeated N times")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def figure_long_horizon(runs, path):
    """Fig. 1b: target validation loss over a long horizon (mean over seeds), its minimum marked,
    and accuracy on a second axis where the runs logged it (train.py's accuracy_samples) or where
    their exports were scored (evaluate.py)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    plot_curves(ax, runs, "val_loss", "target validation loss", color="tab:blue")
    best = np.mean([summary(run)["best_epoch"] for run in runs])
    ax.axvline(best, color="tab:blue", lw=0.8, ls=":", label=f"lowest at epoch {best:.1f}")
    ax.set(xlabel="target epoch", ylabel="target validation loss (nats/token)",
           title="Fig. 1b: the baseline over a long horizon")
    logged = [run for run in runs if np.isfinite(run["accuracy"]).any()]
    curve = accuracy_curve(runs, None)
    if logged or curve:
        accuracy_ax = ax.twinx()
        if logged:
            plot_curves(accuracy_ax, logged, "accuracy", "answer accuracy", color="tab:green")
        else:
            accuracy_ax.plot(*zip(*curve), "o-", color="tab:green", label="answer accuracy")
        accuracy_ax.set_ylabel("answer accuracy")
        accuracy_ax.legend(loc="lower right")
    ax.legend(loc="upper left")  # the curve climbs to the right after its turn
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def base_entropies(config):
    """The base model's entropy cache of a run's target data, and its tokenizer."""
    header = cache_header(config["init_from"], config["target_data"], config["seq_len"])
    cache_path = config["entropy_cache"] or default_cache_path(config["target_data"],
                                                               header["model"], config["seq_len"])
    return (load_entropy_cache(cache_path, header, "run train.py once to build it"),
            load_tokenizer(config["init_from"]))


def text_color(rgb):
    """Black or white, whichever contrasts more with a box of color rgb (0-1 sRGB): the contrast
    ratio of WCAG 2, (L1 + 0.05) / (L2 + 0.05) of relative luminances in linear light."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "black" if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else "white"


def token_boxes(pieces, width):
    """Lay decoded tokens out as lines of text: [(column, row, text, token index)], one box per
    token, or per part of a token that holds a newline. Lines break between words, as text wraps:
    a word (the tokens from one that starts with white space, or follows one that ends with it, to
    the next such) that would run past `width` characters starts the next line; a word longer than
    a line breaks between its tokens."""
    def starts_word(index):
        return index == 0 or pieces[index][:1].isspace() or pieces[index - 1][-1:].isspace()

    def word_length(index):
        length = len(pieces[index].split("\n")[0])
        for k in range(index + 1, len(pieces)):
            if starts_word(k) or "\n" in pieces[k - 1]:
                break
            length += len(pieces[k].split("\n")[0])
        return length

    boxes, column, row = [], 0, 0
    for index, piece in enumerate(pieces):
        for part_index, part in enumerate(piece.split("\n")):
            too_long = word_length(index) if starts_word(index) else len(part)
            if part_index or (column > 0 and column + too_long > width):
                column, row = 0, row + 1
            if part:
                boxes.append((column, row, part, index))
                column += len(part)
    return boxes


def figure_entropy_text(config, path, width=72):
    """Fig. 2c: one validation problem, each token a box shaded by its entropy under the base model.
    Tokens are decoded one by one with the base model's own tokenizer, so a real model's tokens
    (whole words, a space in front) show as they are, and a byte-level model's as characters."""
    cache, tokenizer = base_entropies(config)
    windows = read_windows(config["target_data"], "val", config["seq_len"])
    # the first whole document between two end-of-text tokens
    for index, window in enumerate(windows):
        ends = np.flatnonzero(window == tokenizer.eos_id)
        if len(ends) >= 2:
            start, stop = ends[0] + 1, ends[1]
            break
    else:  # documents longer than a window: show the first window from its first predicted token
        index, window, start, stop = 0, windows[0], 1, len(windows[0])
    entropy = cache["val_entropy"][index].numpy()[start:stop]
    boxes = token_boxes([tokenizer.decode([int(token)]) for token in window[start:stop]], width)
    cmap, top = plt.get_cmap("magma_r"), float(np.nanpercentile(entropy, 99))
    rows = boxes[-1][1] + 1 if boxes else 1
    cell = 0.6  # a monospace character is about 0.6 times as wide as it is tall
    fig, ax = plt.subplots(figsize=(width * cell * 0.16 + 1.5, rows * 0.2 + 1.0))
    for column, row, text, token in boxes:
        color = cmap(min(1.0, entropy[token] / top))
        ax.add_patch(plt.Rectangle((column * cell, -row * 1.25 - 0.5), len(text) * cell, 1,
                                   facecolor=color, edgecolor="white", lw=0.8))
        for k, char in enumerate(text):
            ax.text((column + k + 0.5) * cell, -row * 1.25, char, family="monospace", fontsize=8.5,
                    ha="center", va="center", color=text_color(color))
    ax.set(xlim=(0, width * cell), ylim=(-(rows - 1) * 1.25 - 0.6, 0.6), aspect="equal")
    ax.axis("off")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top)), ax=ax, fraction=0.02,
                 pad=0.01, label="entropy (nats)")
    ax.set_title("Fig. 2c: a validation problem, "
                 "each token boxed and shaded by its base-model entropy")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def entropy_report(config, figures, top=12):
    """What the base model finds predictable in the target training data: the distribution of
    token entropies, the tokens most often among the low-entropy half and the high-entropy
    quarter (ranked over all tokens; Eq. 2 ranks within each window, which splits about the same),
    and the share of the base model's loss that each group carries."""
    cache, tokenizer = base_entropies(config)
    tokens = read_windows(config["target_data"], "train", config["seq_len"])[:, 1:].ravel()
    entropy, nll = (cache["train_entropy"][:, 1:].numpy().ravel(),
                    cache["train_nll"][:, 1:].numpy().ravel())
    order = np.argsort(entropy, kind="stable")
    groups = {"low-entropy half": order[:len(order) // 2],
              "high-entropy quarter": order[len(order) - len(order) // 4:]}
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.hist(entropy, bins=60, color="tab:gray")
    for q, name in ((50, "median: the gate at 50%"), (75, "75th percentile")):
        ax.axvline(np.percentile(entropy, q), color="tab:red" if q == 50 else "tab:orange", lw=1.2,
                   label=name)
    ax.set(xlabel="entropy under the base model (nats)", ylabel="target training tokens",
           yscale="log", title="Token entropies of the target data under the base model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figures / "entropy_hist.png", dpi=130)
    plt.close(fig)
    lines = ["## Which tokens are low- and high-entropy", "",
             f"{len(entropy):,} target training tokens; entropy mean {entropy.mean():.2f} nats, "
             f"median {np.median(entropy):.2f}, 75th percentile {np.percentile(entropy, 75):.2f}. "
             f"The base model's loss on them: {nll.mean():.3f} nats per token, of which the "
             f"low-entropy half carries {nll[groups['low-entropy half']].sum() / nll.sum():.1%} "
             f"and the high-entropy quarter "
             f"{nll[groups['high-entropy quarter']].sum() / nll.sum():.1%}.", "",
             "![Entropy distribution](figures/entropy_hist.png)", ""]
    for name, where in groups.items():
        ids, counts = np.unique(tokens[where], return_counts=True)
        rows = [[f"`{tokenizer.decode([int(i)])!r}`", count,
                 f"{entropy[where][tokens[where] == i].mean():.2f}"]
                for i, count in sorted(zip(ids, counts), key=lambda ic: -ic[1])[:top]]
        lines += [f"Most frequent tokens of the {name}:", "",
                  table(["token", "count", "mean entropy"], rows), ""]
    return lines


def fill_vector_report(config):
    """How far the fill vector e_bar (Eq. 1: the mean of the base model's input embeddings) lies
    from the inputs it replaces, beside the zero vector that Appendix A.3 finds unstable: their
    norms, and Theorem 1's delta (A2: e_bar against the mean embedding of the gated tokens) and
    sigma (A1: the spread of the gated tokens' embeddings)."""
    cache, _ = base_entropies(config)
    model = Transformer.from_pretrained(config["init_from"])
    embeddings, fill = model.embed_tokens.weight.detach().float(), model.fill_embedding.float()
    T = config["seq_len"]
    inputs = torch.from_numpy(read_windows(config["target_data"], "train", T))[:, :T]
    gated = gate(cache["train_entropy"][:, :T], config["gate_percentile"], "low")  # Eq. (2)
    # Averages over the gated tokens as weights over the vocabulary: one (vocab,) count vector in
    # memory rather than a (tokens, d) matrix (10 GB for the paper's 0.02B tokens at d = 1024).
    share = torch.bincount(inputs[gated], minlength=len(embeddings)).float() / gated.sum()
    center = share @ embeddings
    rows = [["e_bar (the mean fill)", f"{fill.norm():.3f}"],
            ["a vocabulary row, on average", f"{embeddings.norm(dim=1).mean():.3f}"],
            ["a gated target token's embedding, on average: how far a zero fill moves it",
             f"{share @ embeddings.norm(dim=1):.3f}"],
            ["a gated token's embedding minus e_bar, on average: how far the mean fill moves it",
             f"{share @ (embeddings - fill).norm(dim=1):.3f}"],
            ["delta (A2): e_bar minus the gated tokens' mean embedding",
             f"{(fill - center).norm():.3f}"],
            ["sigma (A1): root mean square distance of the gated tokens from their mean",
             f"{(share @ (embeddings - center).norm(dim=1).pow(2)).sqrt():.3f}"]]
    return [f"Norms in the base model's input embedding space ({embeddings.shape[0]:,} vocabulary "
            f"rows, {int(gated.sum()):,} gated target training tokens, gate "
            f"{config['gate_percentile']:.0%}):", "", table(["vector", "norm"], rows), ""]


def per_seed_table(groups, names):
    """Every seed's own numbers behind the means +- std of the tables, "a / b / c" in seed order."""
    columns = {"min val loss": ("min_val_loss", ".3f"), "best epoch": ("best_epoch", ".1f"),
               "final val loss": ("final_val_loss", ".3f"), "rise after best": ("rise", ".1%"),
               "general val loss at best": ("general_at_best", ".3f"),
               "general val loss, final": ("general_final", ".3f")}
    rows = []
    for name in names:
        summaries = [summary(run) for run in groups[name]]
        seeds = " / ".join(str(run["config"]["seed"]) for run in groups[name])
        values = [" / ".join(format(s[key], spec) for s in summaries)
                  for key, spec in columns.values()]
        rows.append([group_label(groups, name), seeds, *values])
    return table(["setting", "seeds", *columns], rows)


# ---- Theorem 1: gradient variance against the masking rate ----------------------------------

def gradient_variance(config, gammas, samples, checkpoint=None, seed=0):
    """Empirical variance of the per-window gradient, E||g - E g||^2 over windows and masks, for
    EntroDrop masks that drop each gated token with probability gamma (Eq. 3), at each gamma, with
    the base model's weights (where continual pre-training starts) or, given a run's ckpt/ folder,
    the weights it ended with. The same windows and mask draws are used for both. Runs on a GPU when
    there is one. Returns the variances and alpha, the gated share of tokens (Theorem 1's
    sum_t g_t / T), so that the masking rate of each point is gamma * alpha."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer.from_pretrained(config["init_from"], device=device)
    if checkpoint is not None:
        load_training_state(checkpoint, model)
    header = cache_header(config["init_from"], config["target_data"], config["seq_len"])
    cache_path = config["entropy_cache"] or default_cache_path(config["target_data"],
                                                               header["model"], config["seq_len"])
    scores = load_entropy_cache(cache_path, header,
                                "run train.py once to build it")["train_entropy"]
    T = config["seq_len"]
    indices = np.random.default_rng(seed).permutation(len(scores))[:samples]
    windows = torch.from_numpy(read_windows(config["target_data"], "train", T, indices)).to(device)
    eligible = gate(scores[indices, :T], config["gate_percentile"], "low")  # (samples, T)
    # a little under gate_percentile: the first token is never gated
    alpha = eligible.float().mean().item()
    generator = torch.Generator().manual_seed(seed)
    variances = []
    for gamma in gammas:
        # Welford's running mean, in float64: one parameter-sized vector rather than one per window
        # (48 windows of Qwen3-0.6B's gradients would be 115 GB).
        mean, squared_deviations = None, 0.0
        for n in range(1, len(indices) + 1):
            mask = eligible[n - 1:n] & (torch.rand(1, T, generator=generator) < gamma)  # Eq. (3)
            model.zero_grad()
            _, loss = model(windows[n - 1:n, :-1], windows[n - 1:n, 1:], fill_mask=mask.to(device))
            loss.backward()
            if mean is None:
                mean = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                                   device=device)
            # g - old mean
            delta = torch.cat([p.grad.flatten() for p in model.parameters()]).double().sub_(mean)
            mean.add_(delta, alpha=1 / n)
            # (g - old mean).(g - new mean)
            squared_deviations += (1 - 1 / n) * torch.dot(delta, delta).item()
        variances.append(squared_deviations / len(indices))
    return np.array(variances), alpha


def fit_variance(rates, variances):
    """Fit the bound's quadratic form V(x) = V0 (1 - x) + K x^2 (x = gamma * alpha, V0 the unmasked
    variance; Theorem 1) and a free quadratic, and find where the measured variance is lowest."""
    v0, x = variances[0], np.asarray(rates)
    k = np.linalg.lstsq((x ** 2)[:, None], variances - v0 * (1 - x), rcond=None)[0][0]
    free = np.polyfit(x, variances, 2)
    return {"K": k, "free": free, "lowest_rate": float(x[int(np.argmin(variances))])}


def figure_variance(rates, curves, path):
    """curves: {weights name: (variances, fit)}; each curve relative to its own unmasked
    variance."""
    x, grid = np.asarray(rates), np.linspace(0, max(rates), 200)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, (variances, fit) in curves.items():
        v0 = variances[0]
        dots, = ax.plot(x, variances / v0, "o", label=f"{name}: measured")
        ax.plot(grid, (v0 * (1 - grid) + fit["K"] * grid ** 2) / v0, "-", color=dots.get_color(),
                label=f"{name}: bound's form V0(1 - x) + K x^2")
        ax.plot(grid, np.polyval(fit["free"], grid) / v0, ":", color=dots.get_color(),
                label=f"{name}: free quadratic")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="masking rate gamma * alpha", ylabel="gradient variance / unmasked variance",
           title="Theorem 1 check: gradient variance under EntroDrop masks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---- the report --------------------------------------------------------------------------

def repetition_section(groups, figures):
    """Fig. 1a and its table, when the folder holds repeat<N> runs."""
    points = repetition_points(groups)
    if len(points) < 2:
        return []
    figure_repetition(groups, points, figures / "fig1a.png")
    rows, final = [], {}
    for repeats, name in points:
        summaries, first = [summary(run) for run in groups[name]], groups[name][0]
        col = lambda key, **kw: mean_std([s[key] for s in summaries], **kw)  # noqa: E731
        final[repeats] = np.mean([s["final_val_loss"] for s in summaries])
        lowest = f"{col('min_val_loss')} (epoch {col('best_epoch', digits=1)})"
        rows.append([f"{repeats:g}", group_label(groups, name), len(summaries),
                     f"{first['config']['target_ratio']:g}", f"{budget(first):,}",
                     col("final_val_loss"), lowest, col("general_final")])
    header = ["N", "setting", "seeds", "target share of rows", "tokens trained",
              "final target val loss", "min target val loss", "general val loss, final"]
    return ["## Fig. 1a: a fixed token budget, the target data repeated N times", "",
            "Every run trains on the same number of tokens; the target data takes N epochs of them "
            "and general data the rest (Sec. 2, RQ1: |D_general| = budget - N |D_target|). The "
            "paper plots accuracy; here the target loss at the end of the budget is lowest at "
            f"N = {min(final, key=final.get):g}.", "", table(header, rows), "",
            "![Fig. 1a](figures/fig1a.png)", ""]


def sweeps_section(groups, swept, figures):
    """Fig. 3 and its table, for the methods in `swept` (those with more than one setting)."""
    if not swept:
        return []
    figure_sweeps(groups, swept, figures / "fig3.png")
    names = [name for method in swept for _, name in family(groups, method)]
    return ["## Fig. 3: the baselines' sweeps (Appendix A.2)", "",
            "The paper tries hidden dropout 0.05 and 0.1 and weight decay 0.1, 0.3 and 0.5, and "
            "reports the best of each in its main table. Best here: the lowest minimum target "
            "validation loss, averaged over seeds.", "",
            summary_table(groups, ["baseline", *names], "setting"), "",
            "![Fig. 3](figures/fig3.png)", ""]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


SUMMARY_HEADER = ["min val loss", "best epoch", "final val loss", "rise after best",
                  "low-entropy loss", "high-entropy loss", "general val loss"]


def summary_table(groups, names, first_column="method"):
    """The loss summary of each setting, and the accuracy by the paper's rule (the export with the
    highest accuracy) when its exports were scored."""
    accuracy = any(accuracy_summary(run)["highest"] for name in names for run in groups[name])
    rows = []
    for name in names:
        s = [summary(run) for run in groups[name]]
        col = lambda key, **kw: mean_std([x[key] for x in s], **kw)  # noqa: E731
        rows.append([group_label(groups, name), len(s), col("min_val_loss"),
                     col("best_epoch", digits=1), col("final_val_loss"),
                     col("rise", digits=1, percent=True),
                     f"{col('low_at_best')} → {col('low_final')}",
                     f"{col('high_at_best')} → {col('high_final')}",
                     f"{col('general_at_best')} → {col('general_final')}"])
        if accuracy:
            rows[-1].append(accuracy_cell([accuracy_summary(run)["highest"]
                                           for run in groups[name]]))
    return table([first_column, "seeds", *SUMMARY_HEADER,
                  *(["accuracy (highest export)"] if accuracy else [])], rows)


def run_midpoint(run):
    """The j0 a run used: the curriculum record of its log (auto: and patience:), else its setting;
    None if patience never found one."""
    records = [json.loads(line) for line in (run["folder"] / "log.jsonl").read_text().splitlines()]
    found = [r["midpoint"] for r in records if r["kind"] == "curriculum"]
    setting = run["config"].get("curriculum_midpoint")
    return found[-1] if found else (None if isinstance(setting, str) else setting)


def beyond_section(groups, figures, base_model):
    """Static vs online scores and j0 by hand vs found automatically, beside the baseline."""
    names = [n for n in ("baseline", "entrodrop", *BEYOND) if n in groups]
    if not any(n in groups for n in BEYOND):
        return []
    figure_methods(groups, names, "Beyond the paper: online entropy, j0 found automatically",
                   figures / "beyond.png", base_model)
    midpoints = []
    for name in names[1:]:
        values = [run_midpoint(run) for run in groups[name]]
        shown = ", ".join("none found" if v is None else f"{v:.2f}" for v in values)
        midpoints.append(f"{label(name)}: {shown}")
    return ["## Beyond the paper: online entropy, j0 found automatically", "",
            summary_table(groups, names, "run"), "",
            "j0 (epoch) per seed: " + "; ".join(midpoints) + ".", "",
            "![beyond](figures/beyond.png)", ""]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Figures and tables from training runs.")
    parser.add_argument("root", help="a folder of runs (e.g. out/demo)")
    parser.add_argument("--variance_samples", type=int, default=48,
                        help="windows per masking rate (0 = skip)")
    args = parser.parse_args(argv)
    groups = load_runs(args.root)
    if "baseline" not in groups:
        raise FileNotFoundError(f"{args.root} has no finished run folder named 'baseline' "
                                "(with log.jsonl)")
    figures = Path(args.root) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    report = [f"# Results from {args.root}", "",
              "Target validation loss in nats per token; epochs are passes over the scarce target "
              "set. Low/high: loss on the base model's 50% most / 25% least confident validation "
              "tokens, at the best epoch → at the last epoch. Mean ± std over seeds where there "
              "are several.", ""]

    base_model = groups.get("entrodrop", groups["baseline"])[0]["config"]["init_from"]
    methods = compared_methods(groups)
    report += ["## Methods", "", summary_table(groups, methods), ""]
    swept = [method for method in FAMILIES if len(family(groups, method)) > 1]
    if swept:
        swept_names = " and ".join(METHODS[method] for method in swept)
        report += [f"{swept_names.capitalize()}: each by the setting of its sweep with the lowest "
                   "minimum, averaged over seeds (Fig. 3 below), here and in Fig. 2a.", ""]
    base = [summary(run) for run in groups["baseline"]]
    rise = np.mean([s["final_val_loss"] - s["min_val_loss"] for s in base])
    if rise > 0:  # the groups hold 50% and 25% of the validation targets
        high = np.mean([0.25 * (s["high_final"] - s["high_at_best"]) for s in base]) / rise
        low = np.mean([0.5 * (s["low_final"] - s["low_at_best"]) for s in base]) / rise
        report += [f"Of the baseline's rise in target validation loss after its best epoch, the "
                   f"high-entropy quarter of the tokens accounts for {high:.0%} and the "
                   f"low-entropy half for {low:.0%}.", ""]
    figure_groups(groups, ["baseline"], "Fig. 1c: baseline, loss by base-model entropy group",
                  figures / "fig1c.png")
    figure_methods(groups, methods, "Fig. 2a: target validation loss, every method",
                   figures / "fig2a.png", base_model)
    report += ["![Fig. 1c](figures/fig1c.png)", "", "![Fig. 2a](figures/fig2a.png)", ""]
    if "entrodrop" in groups:
        figure_groups(groups, ["baseline", "entrodrop"],
                      "Fig. 4: baseline (solid) vs EntroDrop (dashed)", figures / "fig4.png")
        report += ["![Fig. 4](figures/fig4.png)", ""]
    report += repetition_section(groups, figures)
    if "baseline_long" in groups:
        figure_long_horizon(groups["baseline_long"], figures / "fig1b.png")
        report += ["## Fig. 1b: the baseline over a long horizon", "",
                   summary_table(groups, ["baseline", "baseline_long"], "run"), "",
                   "![Fig. 1b](figures/fig1b.png)", ""]
    if "entrodrop_fixed" in groups:
        names = ["baseline", "entrodrop",
                 *sorted(n for n in groups if n.startswith("entrodrop_midpoint")),
                 "entrodrop_fixed"]
        figure_methods(groups, names, "Fig. 2b: curriculum vs fixed ratio", figures / "fig2b.png",
                       base_model)
        report += ["## Curriculum vs fixed ratio (Fig. 2b)", "",
                   summary_table(groups, names, "run"), "", "![Fig. 2b](figures/fig2b.png)", ""]
    targeting = [n for n in ("entrodrop_random", "entrodrop_high", "entrodrop", "token_dropout")
                 if n in groups]
    if "entrodrop_random" in groups or "entrodrop_high" in groups:
        report += ["## Table 3: which tokens to mask", "",
                   "Random share, high and low entropy gate the same number of tokens (matched "
                   "expected masking); token dropout over all tokens masks twice as many.", "",
                   summary_table(groups, targeting, "targeting"), ""]
    sweep = sorted((n for n in groups if n.startswith("entrodrop_gamma") or n == "entrodrop"),
                   key=lambda n: groups[n][0]["config"]["gamma_max"])
    if len(sweep) > 1:
        accuracy = any(accuracy_summary(run)["highest"] for n in sweep for run in groups[n])
        rows = [[(f"gamma_max {groups[n][0]['config']['gamma_max']:g}" if n != "baseline"
                  else "baseline"),
                 mean_std([summary(r)["best_epoch"] for r in groups[n]], digits=1),
                 mean_std([summary(r)["min_val_loss"] for r in groups[n]]),
                 *([accuracy_cell([accuracy_summary(r)["highest"] for r in groups[n]])]
                   if accuracy else [])]
                for n in ["baseline", *sweep]]
        report += ["## Table 4: gamma_max", "",
                   table(["run", "best epoch", "min val loss",
                          *(["accuracy (highest export)"] if accuracy else [])], rows), ""]
    report += sweeps_section(groups, swept, figures)
    report += beyond_section(groups, figures, base_model)
    reference = groups.get("entrodrop", groups["baseline"])[0]["config"]
    if "entrodrop_zero_fill" in groups or reference["init_from"] != "scratch":
        report += ["## Appendix A.3: mean vs zero fill", ""]
        if reference["init_from"] != "scratch":
            report += fill_vector_report(reference)
        if "entrodrop_zero_fill" in groups:
            report += [summary_table(groups, ["entrodrop", "entrodrop_zero_fill"], "run"), ""]
    sweeps = [name for method in FAMILIES for _, name in family(groups, method)]
    repetitions = [name for _, name in repetition_points(groups)]
    every_setting = dict.fromkeys([*methods, *sweeps, *repetitions, *sorted(groups)])
    report += ["## Per seed", "",
               "Each seed's own numbers behind the means ± std above, in seed order.", "",
               per_seed_table(groups, list(every_setting)), ""]

    ablations = [name for name in ABLATIONS if name in groups]
    report += accuracy_section(groups, [*methods, *ablations], base_model)
    if reference["init_from"] != "scratch":
        figure_entropy_text(reference, figures / "fig2c.png")
        report += ["## Fig. 2c: entropy of each token of a validation problem", "",
                   "![Fig. 2c](figures/fig2c.png)", ""]
        report += entropy_report(reference, figures)
        if args.variance_samples:
            gammas = np.linspace(0.0, 1.0, 6)  # from no masking to every gated token masked
            weights = {"base model": None}
            if "entrodrop" in groups:
                weights["EntroDrop, last step"] = groups["entrodrop"][0]["folder"] / "ckpt"
            curves = {}
            for name, checkpoint in weights.items():
                variances, alpha = gradient_variance(reference, gammas, args.variance_samples,
                                                     checkpoint)
                rates = gammas * alpha  # the same for both sets of weights: same windows, same gate
                curves[name] = (variances, fit_variance(rates, variances))
            figure_variance(rates, curves, figures / "theorem1.png")
            report += ["## Theorem 1 check: gradient variance against the masking rate", "",
                       f"{args.variance_samples} target windows per rate, EntroDrop masks (gate "
                       f"{reference['gate_percentile']:.0%} lowest entropy, so alpha = {alpha:.3f} "
                       "of the tokens), same windows and draws for each set of weights.", "",
                       table(["weights", *[f"γα = {r:.3f}" for r in rates], "K (V0)",
                              "lowest at"],
                             [[name, *[f"{v / variances[0]:.3f}" for v in variances],
                               f"{fit['K']:.4g} ({variances[0]:.4g})", f"{fit['lowest_rate']:.3f}"]
                              for name, (variances, fit) in curves.items()]), "",
                       "Each row is the variance relative to no masking; K is the fit of the "
                       "bound's form V0 (1 - x) + K x^2 and 'lowest at' the masking rate with the "
                       "lowest measured variance.", "",
                       "![Theorem 1](figures/theorem1.png)", ""]
    (Path(args.root) / "results.md").write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
