"""
Continual pre-training on scarce target data repeated for many epochs, mixed with general data,
with EntroDrop or any baseline of the paper; one process, or DDP under torchrun.

    python train.py                     # the embedded CPU demo (after `make demo` made its inputs)
    python train.py --method=baseline --out_dir=out/demo/baseline
    torchrun --nproc_per_node=8 train.py config/qwen3_0.6b_math.py --method=entrodrop

Every setting is a field of Config below. A preset in config/ assigns some of them, and each
--key=value overrides one. The defaults are the CPU demo's continual pre-training run.
"""

import ast
import gc
import json
import math
import os
import runpy
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from checkpoint import (export, interrupts_held, load_training_state, lock_out_dir,
                        read_train_state, save_training_state, tidy_out_dir, write_durably)
from data.loader import MixtureLoader, load_meta, read_windows, verify_checksums
from dropout import (HIDDEN_DROPOUT, TARGETING_MODES, draw_gamma, neftune_noise, refresh_scores,
                     row_scores, seed_for, token_dropout_mask)
from entropy import (build_entropy_cache, cache_header, default_cache_path, load_entropy_cache,
                     token_entropies)
from evaluate import FORMATS, read_problems, score
from model import ModelConfig, Transformer
from parallel import (PARALLEL_MODES, Cluster, equal_share, gather_from_all_ranks, reshard,
                      set_gradient_sync, start, wrap)
from schedule import gamma_max_at, learning_rate_at, turn_by_patience, turning_epoch
from tokenizer import load_tokenizer

METHODS = ("baseline", "weight_decay", "hidden_dropout", "neftune", "token_dropout", "entrodrop")
TOKEN_DROPOUT_METHODS = ("token_dropout", "entrodrop")
TOKEN_DROPOUT_KEYS = {"gamma_max", "gate_percentile", "targeting", "score", "curriculum",
                      "curriculum_sharpness", "curriculum_midpoint", "curriculum_unit", "fill",
                      "score_source"}
# Settings a run may be resumed with changed: where it lives, and how the same global batch is split
# and computed (another GPU, another number of ranks, sharded or not, recomputed activations).
RESUMABLE_KEYS = {"resume", "out_dir", "micro_batch_size", "parallel", "activation_checkpointing",
                  "compile"}


@dataclass
class Config:
    # ---- model and data
    init_from: str = "out/demo/base/best"      # base model: a HF checkpoint folder, or "scratch"
    scratch_model: dict = field(default_factory=dict)  # init_from="scratch": ModelConfig fields
                                                       # of the new model
    tokenizer: str = "byte"                    # init_from="scratch" only; a checkpoint has its own
    out_dir: str = "out/demo/entrodrop"        # checkpoints, log.jsonl, best/ (exported best model)
    target_data: str = "out/demo/data/math"    # the scarce domain data, repeated for many epochs
    general_data: str = "out/demo/data/general"  # replay data, read once through
    entropy_cache: str = ""                    # "" = inside target_data, named by base model
                                               # and seq_len
    target_ratio: float = 0.6                  # share of each batch's rows from target data (6:4)
    seq_len: int = 256                         # tokens per row
    global_batch_size: int = 10                # rows per optimizer step, over all ranks
    micro_batch_size: int = 10                 # rows per forward pass; accumulation is derived
    epochs: float = 40.0                       # passes over the target data
    max_steps: int = 0                         # if > 0, train this many optimizer steps instead
    # ---- optimizer (AdamW; decay only on matrices)
    learning_rate: float = 1e-3                # peak learning rate
    min_lr: float = 1e-3                       # cosine floor; equal to learning_rate: constant
    warmup_steps: int = 0
    weight_decay: float = 0.0                  # method weight_decay: must be > 0; others: 0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                     # max global gradient norm; 0 = off
    # ---- method (the paper's names)
    method: str = "entrodrop"                  # one of METHODS
    gamma_max: float = 0.4                     # token dropout: ceiling of gamma_j
                                               # ~ U(0, gamma_max(j)), Eq. (4); the demo's;
                                               # the paper (and the GPU presets) use 0.1
    gate_percentile: float = 0.5               # entrodrop: share of each row's tokens eligible,
                                               # Eq. (2)
    targeting: str = "low"                     # entrodrop: "low" (EntroDrop), "high" or "random"
                                               # (ablations)
    score: str = "entropy"                     # entrodrop: rank tokens by "entropy" or "nll"
                                               # (confidence)
    score_source: str = "static"               # entrodrop: "static", the base model's scores
                                               # (the paper), or "online": each window's entropies
                                               # under the current model, from its latest training
                                               # pass (dropout.refresh_scores)
    curriculum: str = "sigmoid"                # token dropout: "sigmoid" (Eq. 4) or "constant"
                                               # (fixed ratio)
    curriculum_sharpness: float = 1.0          # k of Eq. (4), per curriculum_unit
    curriculum_midpoint: float | str = 9.0     # j0 of Eq. (4), in curriculum_unit: where the
                                               # baseline's target val loss bottoms (Sec. 3.3);
                                               # epoch 9 in the demo.
                                               # "auto:<folder>": read off baseline run(s) there;
                                               # "patience:<P>": found in the run (turn_by_patience)
    curriculum_unit: str = "epoch"             # "epoch" (target epochs) or "step" (optimizer steps)
    fill: str = "mean"                         # token dropout: "mean" embedding (Eq. 1) or "zero"
                                               # (A.3)
    neftune_alpha: float = 5.0                 # neftune: noise scale alpha / sqrt(L * d)
    dropout: float = 0.0                       # hidden_dropout: must be > 0; others: 0
    # ---- evaluation, logging, checkpoints
    eval_interval: int = 0                     # evaluate every this many steps (0: epoch ends only)
    general_eval_windows: int = 64             # general validation windows per evaluation
    accuracy_problems: str = ""                # JSONL of problems: greedy-decoding accuracy
                                               # (evaluate.py)
    accuracy_format: str = "embedded"          # their format: one of evaluate.FORMATS
    accuracy_samples: int = 0                  # how many of them per evaluation (0 = off)
    export_every: int = 0                      # also export the model every this many target
                                               # epochs, and at the end, to out_dir/epochs/<epoch>/
                                               # (0 = only best/)
    log_interval: int = 10                     # log a training record every this many steps
    checkpoint_interval: int = 100             # save out_dir/ckpt/ every this many steps
    # ---- system
    seed: int = 1337
    device: str = "auto"                       # "auto", "cpu", "cuda"
    dtype: str = "auto"                        # "auto" (bfloat16 autocast on GPU, float32 on CPU),
                                               # "float32", "bfloat16"
    compile: bool = False                      # torch.compile the model (helps on GPU)
    parallel: str = "ddp"                      # under torchrun: "ddp" (whole model on every rank)
                                               # or "fsdp" (weights, gradients and AdamW state
                                               # sharded: parallel.py)
    activation_checkpointing: bool = False     # recompute each block in backward, not store it
    resume: bool = False                       # continue from out_dir/ckpt/ if it exists


# The values each numeric setting may take, in interval notation; validate() checks them all, and
# NaN or an infinity never passes. (seed: numpy and torch take seeds below 2^64; rank is added.)
NUMBER_RANGES = {
    "target_ratio": "(0, 1]", "seq_len": "[1, inf)", "global_batch_size": "[1, inf)",
    "micro_batch_size": "[1, inf)", "epochs": "[0, inf)", "max_steps": "[0, inf)",
    "learning_rate": "(0, inf)", "min_lr": "[0, inf)", "warmup_steps": "[0, inf)",
    "weight_decay": "[0, inf)", "beta1": "[0, 1)", "beta2": "[0, 1)", "grad_clip": "[0, inf)",
    "gamma_max": "[0, 1]", "gate_percentile": "(0, 1]", "curriculum_sharpness": "(0, inf)",
    "curriculum_midpoint": "(-inf, inf)", "neftune_alpha": "[0, inf)", "dropout": "[0, 1)",
    "eval_interval": "[0, inf)", "general_eval_windows": "[0, inf)", "accuracy_samples": "[0, inf)",
    "export_every": "[0, inf)", "log_interval": "[1, inf)", "checkpoint_interval": "[1, inf)",
    "seed": "[0, 1e18]",
}


def in_interval(value, interval) -> bool:
    """Is value a finite number inside interval, written "[low, high)" and the like?"""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above and below


def parse_config(argv) -> Config:
    """Presets (python files of assignments) and --key=value overrides, applied in order."""
    types = {f.name: f.type for f in fields(Config)}
    values = {}
    for arg in argv:
        if arg.startswith("--"):
            key, equals, text = arg[2:].partition("=")
            if not equals:
                raise ValueError(f"argument {arg!r}: write overrides as --key=value")
            try:
                values[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                values[key] = text  # a bare string such as --method=baseline
        else:
            preset = runpy.run_path(arg)
            values.update({k: v for k, v in preset.items() if not k.startswith("_")})
    config = Config()
    for key, value in values.items():
        if key not in types:
            raise ValueError(f"unknown config key {key!r}; "
                             "the keys are the fields of Config in train.py")
        allowed = typing.get_args(types[key]) or (types[key],)  # float | str -> (float, str)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # 1 is a fine float
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join(t.__name__ for t in allowed)
            raise ValueError(f"config key {key!r} must be a {names}, got {value!r}")
        setattr(config, key, value)
    return config


def validate(c: Config, cluster: Cluster):
    """Check every setting once, before anything is loaded; each error names the key."""
    def require(ok, message):
        if not ok:
            raise ValueError(message)
    require(c.method in METHODS, f"method={c.method!r} must be one of {METHODS}")
    require(c.targeting in TARGETING_MODES[:3],
            f"targeting={c.targeting!r} must be 'low', 'high' or 'random'")
    for key, allowed in (("score", ("entropy", "nll")), ("curriculum", ("sigmoid", "constant")),
                         ("curriculum_unit", ("epoch", "step")), ("fill", ("mean", "zero")),
                         ("device", ("auto", "cpu", "cuda")),
                         ("dtype", ("auto", "float32", "bfloat16")),
                         ("accuracy_format", FORMATS), ("parallel", PARALLEL_MODES)):
        require(getattr(c, key) in allowed, f"{key}={getattr(c, key)!r} must be one of {allowed}")
    for key, interval in NUMBER_RANGES.items():
        value = getattr(c, key)
        # str: curriculum_midpoint="auto:..."
        require(isinstance(value, str) or in_interval(value, interval),
                f"{key}={value!r} is out of range: it must lie in {interval}")
    require(c.min_lr <= c.learning_rate,
            f"min_lr={c.min_lr} must not exceed learning_rate={c.learning_rate}")
    require(c.accuracy_samples == 0 or c.accuracy_problems,
            f"accuracy_samples={c.accuracy_samples} needs accuracy_problems: "
            "a JSONL file of problems to score")
    require(c.global_batch_size % (c.micro_batch_size * cluster.world_size) == 0,
            f"global_batch_size={c.global_batch_size} must be a multiple of micro_batch_size="
            f"{c.micro_batch_size} x {cluster.world_size} ranks")
    require(c.parallel == "ddp" or cluster.distributed,
            "parallel='fsdp' shards over the ranks of torchrun: start it with torchrun "
            "(--nproc_per_node=1 for one process), or use parallel='ddp'")
    require(c.epochs > 0 or c.max_steps > 0, "set epochs > 0 or max_steps > 0")
    # Each baseline differs from `baseline` in exactly one knob, so tables compare like with like.
    require((c.weight_decay > 0) == (c.method == "weight_decay"),
            f"weight_decay={c.weight_decay}: must be > 0 for method=weight_decay and 0 otherwise")
    require((c.dropout > 0) == (c.method == "hidden_dropout"),
            f"dropout={c.dropout}: must be > 0 for method=hidden_dropout and 0 otherwise")
    dropping = c.method in TOKEN_DROPOUT_METHODS
    require(not dropping or c.gamma_max > 0, f"method={c.method} needs gamma_max > 0")
    for key, default in (("targeting", "low"), ("score", "entropy"), ("curriculum", "sigmoid"),
                         ("fill", "mean")):
        owner_ok = c.method == "entrodrop" if key in ("targeting", "score") else dropping
        require(getattr(c, key) == default or owner_ok,
                f"{key}={getattr(c, key)!r} is an option of token dropout methods, "
                f"not of method={c.method}")
    require(c.score == "entropy" or c.targeting != "random",
            "score='nll' has no effect with targeting='random'")
    midpoint = c.curriculum_midpoint
    require(not isinstance(midpoint, str) or c.curriculum_unit == "epoch" and (
        midpoint.startswith("auto:") or midpoint.startswith("patience:") and midpoint[9:].isdigit()
        and int(midpoint[9:]) >= 1),
        f"curriculum_midpoint={midpoint!r} must be a number, 'auto:<baseline out_dir>' or "
        "'patience:<P>' with a whole P >= 1 (evaluations without improvement), and "
        "curriculum_unit='epoch'")
    require(c.score_source in ("static", "online"),
            f"score_source={c.score_source!r} must be 'static' or 'online'")
    require(c.score_source == "static" or c.method == "entrodrop" and c.score == "entropy"
            and c.targeting != "random",
            f"score_source='online' refreshes entropies that gate tokens: it needs "
            f"method=entrodrop with score='entropy' and targeting 'low' or 'high' (got {c.method}, "
            f"{c.score!r}, {c.targeting!r})")
    require(c.init_from != "scratch" or c.method in ("baseline", "weight_decay", "hidden_dropout"),
            f"method={c.method} perturbs inputs relative to a base model: "
            "init_from must be a checkpoint folder")


def curriculum_midpoint(c) -> float | None:
    """j0 of Eq. (4): the number given, or for "auto:<folder>" the turning epoch (schedule.py) of
    every baseline run whose log.jsonl lies under that folder, averaged over them (seeds); None for
    "patience:<P>", found during the run."""
    if not isinstance(c.curriculum_midpoint, str):
        return c.curriculum_midpoint
    if c.curriculum_midpoint.startswith("patience:"):
        return None
    folder = Path(c.curriculum_midpoint.removeprefix("auto:"))
    turns = []
    for log in sorted(folder.rglob("log.jsonl")):
        evals = [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "eval"]
        if evals:
            turns.append(turning_epoch([r["epoch"] for r in evals], [r["val_loss"] for r in evals]))
    if not turns:
        raise FileNotFoundError(f"curriculum_midpoint={c.curriculum_midpoint!r}: {folder} holds "
                                "no log.jsonl with evaluations; train the baseline there first")
    return sum(turns) / len(turns)


@dataclass
class EvalSets:
    """What each evaluation reads: validation windows (n, seq_len + 1) of the target and general
    data, the base model's entropy groups of the target windows (entropy_groups; None from scratch),
    and the problems whose answers are scored (evaluate.read_problems; [] = no accuracy)."""
    val: torch.Tensor
    general_val: torch.Tensor
    problems: list
    groups: torch.Tensor | None = None


EVAL_MEASURES = ("val_loss", "val_loss_low", "val_loss_high", "general_val_loss", "accuracy")


def evaluate(model, c, sets: EvalSets, tokenizer, cluster, autocast):
    """Target validation loss, overall and by the base model's entropy groups (Sec. 2, RQ3), general
    validation loss, and optionally answer accuracy. Batches are shared out across ranks, every rank
    running the same number of forward passes (see parallel.equal_share)."""
    model.eval()
    device = cluster.device
    slot = {name: i for i, name in enumerate(EVAL_MEASURES)}  # each measure's place in sums, counts
    sums = torch.zeros(len(EVAL_MEASURES), device=device, dtype=torch.float64)
    counts = torch.zeros(len(EVAL_MEASURES), device=device, dtype=torch.float64)
    b, groups, problems = c.micro_batch_size, sets.groups, sets.problems
    with torch.no_grad(), autocast:
        for windows, measure in ((sets.val, "val_loss"), (sets.general_val, "general_val_loss")):
            for first, stop, counted in equal_share(len(windows), cluster.rank,
                                                    cluster.world_size, b):
                nll = token_entropies(model, windows[first:stop].to(device),
                                      return_nll=True)[1][:, 1:]
                if not counted:
                    continue
                sums[slot[measure]] += nll.sum()
                counts[slot[measure]] += nll.numel()
                if measure == "val_loss" and groups is not None:
                    low, high = groups[first:stop].to(device).unbind(1)  # each (b, seq_len)
                    for group, where in (("val_loss_low", low), ("val_loss_high", high)):
                        sums[slot[group]] += nll[where].sum()
                        counts[slot[group]] += where.sum()
        if problems:  # batched greedy decoding, scored by the rules of evaluate.py
            mine = problems[cluster.rank::cluster.world_size]
            padding = -(-len(problems) // cluster.world_size) - len(mine)  # equal shares, as above
            records = score(model, tokenizer, mine + problems[:1] * padding, c.accuracy_format,
                            shots=0, max_new_tokens=256, batch_size=b, progress=False,
                            synchronized=isinstance(model, FSDPModule))[:len(mine)]
            sums[slot["accuracy"]] += sum(r["correct"] for r in records)
            counts[slot["accuracy"]] += len(records)
    if cluster.distributed:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    model.train()
    reshard(model)
    return {name: (sums[i] / counts[i]).item() if counts[i] > 0 else None
            for name, i in slot.items()}


def entropy_groups(val_nll):
    """Fix the evaluation groups once, from the base model: over all validation targets,
    low-entropy = the 50% most confident tokens, high-entropy = the 25% least confident
    (Sec. 2, RQ3).
    val_nll (n, seq_len + 1) -> bool (n, 2, seq_len) masks over each window's targets."""
    nll = val_nll[:, 1:]
    rank = torch.empty(nll.numel(), dtype=torch.long)
    rank[nll.flatten().argsort(stable=True)] = torch.arange(nll.numel())
    rank = rank.view_as(nll)
    return torch.stack((rank < nll.numel() // 2, rank >= nll.numel() - nll.numel() // 4), dim=1)


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (a non-finite loss, an interrupt): one line for the user, no
    traceback."""


def non_finite_message(step, train_loss, grad_norm, ckpt_dir, saved_step):
    kept = f"{ckpt_dir} (step {saved_step}) is intact" if saved_step is not None else \
        "no checkpoint was saved yet"
    return (f"non-finite training at step {step} (loss {train_loss}, "
            f"gradient norm {grad_norm}); stopped before the weights changed, and {kept}. "
            "Lower learning_rate, or check the data")


def interrupted_message(step, saved_step):
    if saved_step is None:
        return f"interrupted at step {step}; the {step} steps are lost: no checkpoint was saved yet"
    return (f"interrupted at step {step}; the {step - saved_step} steps since the checkpoint at "
            f"step {saved_step} will be redone with --resume=True")


def peak_flops(device):
    """Dense bf16 peak of known GPUs from their datasheets, for MFU; None elsewhere."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    known = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12),
             ("H200", 989e12), ("A100", 312e12))
    # first match: "H100" alone is the SXM part
    return next((flops for key, flops in known if key in name), None)


# ---- the seams of main: claiming the folder, an earlier run, the model and data, the entropies

def claim_out_dir(out_dir, cluster):
    """Rank 0 locks out_dir (checkpoint.lock_out_dir) and clears what a killed run left there
    (tidy_out_dir); if it cannot lock it, every rank stops."""
    refusal = None
    if cluster.master:
        try:
            lock_out_dir(out_dir)
            tidy_out_dir(out_dir)
        except ValueError as e:
            refusal = str(e)
    if cluster.distributed:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal:
        raise ValueError(refusal)


def earlier_run(c, ckpt_dir, master):
    """The training state of an earlier run in out_dir, to resume; None for a fresh start;
    "finished" for a finished run with the same settings (reused as it is). A run with other
    settings is never written over."""
    if not ckpt_dir.exists():
        return None
    state = read_train_state(ckpt_dir)
    # Only settings this run reads count: a moved folder or a token dropout knob of a baseline is no
    # change, nor how the same global batch is split and computed (micro-batch, ranks, sharding).
    unread = RESUMABLE_KEYS | (set() if c.method in TOKEN_DROPOUT_METHODS else TOKEN_DROPOUT_KEYS)
    changed = {k for k, v in asdict(c).items() if k not in unread and state["config"].get(k) != v}
    if changed:
        raise ValueError(f"{ckpt_dir} is a run with different settings "
                         f"({', '.join(sorted(changed))}); choose another out_dir or delete it")
    if state["finished"]:
        if master:
            print(f"{ckpt_dir.parent} already holds this finished run; reusing it")
        return "finished"
    if not c.resume:
        raise ValueError(f"{ckpt_dir} holds an unfinished run: pass --resume=True to continue it, "
                         "or choose another out_dir")
    return state


def load_model(c, device):
    """The base model (a HF checkpoint folder) or a new one from scratch, and its tokenizer."""
    torch.manual_seed(c.seed)
    if c.init_from == "scratch":
        tokenizer = load_tokenizer(c.tokenizer)
        config = ModelConfig(**{"vocab_size": tokenizer.vocab_size,
                                "eos_token_id": tokenizer.eos_id,
                                **c.scratch_model, "dropout": c.dropout})
        model = Transformer(config).to(device)
    else:
        tokenizer = load_tokenizer(c.init_from)
        model = Transformer.from_pretrained(c.init_from, device=device, dropout=c.dropout)
    if c.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={c.seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    if c.fill == "zero":
        model.fill_embedding.zero_()  # Appendix A.3's unstable alternative, for the ablation
    model.activation_checkpointing = c.activation_checkpointing
    return tokenizer, model


def load_data(c, tokenizer, vocab_size, cluster):
    """The 6:4 loader, and the validation windows of both sets and the accuracy problems (EvalSets);
    every file is checked against its meta.json and the model's vocabulary."""
    for folder in (c.target_data, c.general_data):
        load_meta(folder, tokenizer, vocab_size)
    loader = MixtureLoader(c.target_data, c.general_data, c.seq_len, c.global_batch_size,
                           c.micro_batch_size, c.target_ratio, c.seed, cluster.rank,
                           cluster.world_size, vocab_size)
    val = torch.from_numpy(read_windows(c.target_data, "val", c.seq_len, vocab_size=vocab_size))
    if len(val) == 0:
        raise ValueError(f"{c.target_data}/val.bin is shorter than one window of "
                         f"{c.seq_len + 1} tokens")
    general_val = torch.from_numpy(read_windows(c.general_data, "val", c.seq_len,
                                                vocab_size=vocab_size)[:c.general_eval_windows])
    if c.general_eval_windows and len(general_val) == 0:
        raise ValueError(f"{c.general_data}/val.bin is shorter than one window of "
                         f"{c.seq_len + 1} tokens, so no general validation loss can be measured; "
                         "prepare it with --val_share > 0, or set general_eval_windows=0 to train "
                         "without it")
    problems = read_problems(c.accuracy_problems, c.accuracy_format)[:c.accuracy_samples] \
        if c.accuracy_samples else []
    return loader, EvalSets(val, general_val, problems)


def base_entropies(c, model, cluster, autocast):
    """The base model's per-token scores of the target training windows (for the gate) and the
    evaluation groups of the validation tokens, from the entropy cache, built first if missing (by
    every rank, before any training). None, None for a model trained from scratch."""
    if c.init_from == "scratch":
        return None, None
    header = cache_header(c.init_from, c.target_data, c.seq_len)
    cache_path = c.entropy_cache or default_cache_path(c.target_data, header["model"], c.seq_len)
    # The cache is keyed on the sha256 in meta.json, so the files must still have it: one read of
    # the target data (80 MB for the paper's 0.02B tokens: well under a second).
    verify_checksums(c.target_data)
    if not Path(cache_path).exists():
        with autocast:
            build_entropy_cache(model.eval(), c.target_data, c.seq_len, cache_path, header,
                                c.micro_batch_size, cluster.rank, cluster.world_size)
        model.train()
        reshard(model)
    hint = (f"python entropy.py --init_from {c.init_from} --target_data {c.target_data} "
            f"--seq_len {c.seq_len} --entropy_cache {cache_path}")
    cache = load_entropy_cache(cache_path, header, hint)
    return cache[f"train_{c.score}"], entropy_groups(cache["val_nll"])


def make_optimizer(model, c, device):
    """AdamW with weight decay on matrices only (under FSDP: on this rank's shards of them)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=c.learning_rate, betas=(c.beta1, c.beta2),
                             fused=device.type == "cuda")


def restore_training_state(resumed, ckpt_dir, model, optimizer, loader, master):
    """A resumed run's model, AdamW moments and loader position as its checkpoint left them.
    -> the best evaluation so far and every (epoch, target val loss) evaluated (fresh: none)."""
    if not resumed:
        return {"val_loss": math.inf, "epoch": None, "step": None}, []
    load_training_state(ckpt_dir, model, optimizer)
    loader.load_state_dict(resumed["loader"])
    if master:
        print(f"resuming from {ckpt_dir} at step {loader.step}")
    return resumed["best"], resumed["evaluations"]


def clip_gradients(model, grad_clip) -> float:
    """Clip the gradients to a global norm of grad_clip (0: no clipping) -> their norm before.
    Under FSDP the norm is a DTensor over every rank's shards: made whole first."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


class RunLog:
    """out_dir/log.jsonl, one JSON record per line, written by rank 0. Every rank counts the
    records, so that the checkpoint can say how many belong to it: a resumed run first drops the
    records written after its checkpoint, then appends."""

    def __init__(self, path: Path, master, kept_lines):
        self.path, self.master, self.lines = path, master, kept_lines
        if master:
            kept = path.read_text().splitlines(keepends=True)[:kept_lines] if kept_lines else []
            write_durably(path, "".join(kept))

    def write(self, record):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.lines += 1


def start_log(c, out_dir, master, resumed, midpoint):
    """config.json, and the run log: a fresh one opens with the settings (and a j0 read off a
    baseline); a resumed one keeps the records its checkpoint counted."""
    if master:
        write_durably(out_dir / "config.json", json.dumps(asdict(c), indent=1) + "\n")
    run_log = RunLog(out_dir / "log.jsonl", master, resumed["log_lines"] if resumed else 0)
    if not resumed:
        run_log.write({"kind": "config", **asdict(c)})
        if isinstance(c.curriculum_midpoint, str) and midpoint is not None:
            run_log.write({"kind": "curriculum", "midpoint": midpoint})
            if master:
                print(f"curriculum midpoint j0 = epoch {midpoint:.2f}, "
                      f"from {c.curriculum_midpoint}")
    return run_log


def log_step(run_log, master, max_steps, record):
    """A training record in the log, and its line on the console."""
    run_log.write({"kind": "train", **record})
    if master:
        print(f"step {record['step']}/{max_steps} epoch {record['epoch']:.2f} "
              f"loss {record['train_loss']:.4f} lr {record['lr']:.2e} "
              f"gamma_max(j) {record['gamma_max_j']:.3f} grad_norm {record['grad_norm']:.3f} "
              f"{record['tokens_per_sec']:,.0f} tok/s")


def to_device(tensor, device):
    """To the GPU from page-locked memory without blocking: a copy from ordinary memory would wait
    for all queued GPU work, leaving the GPU idle while the next micro-batch is prepared."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def evaluate_and_export(model, c, sets, tokenizer, cluster, autocast, at, best, evaluations,
                        run_log):
    """One evaluation point: the losses (and accuracy), logged and added to evaluations as (epoch,
    target val loss); the best model so far by target validation loss exported to best/ (for
    lm-eval, OpenCompass, vLLM), and every export_every epochs to epochs/<epoch>/ (the paper's rule
    picks among these by accuracy: analyze.py). -> best"""
    results = evaluate(model, c, sets, tokenizer, cluster, autocast)
    evaluations.append((at["epoch"], results["val_loss"]))
    if results["val_loss"] < best["val_loss"]:
        best = {"val_loss": results["val_loss"], "epoch": at["epoch"], "step": at["step"]}
        export(model, tokenizer, Path(c.out_dir) / "best", cluster)
    if c.export_every and (at["last"] or (at["epoch_end"]
                                          and math.floor(at["epoch"]) % c.export_every == 0)):
        # Named by whole target epochs; a run stopped by max_steps mid-epoch ends with e.g. 3.40.
        name = str(math.floor(at["epoch"])) if at["epoch_end"] else f"{at['epoch']:.2f}"
        export(model, tokenizer, Path(c.out_dir) / "epochs" / name, cluster)
    run_log.write({"kind": "eval", "step": at["step"], "epoch": at["epoch"], **results,
                   "best_val_loss": best["val_loss"], "best_epoch": best["epoch"]})
    if cluster.master:
        measured = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if v is not None)
        print(f"eval step {at['step']} epoch {at['epoch']:.2f}: {measured}, "
              f"best {best['val_loss']:.4f} at epoch {best['epoch']:.2f}")
    return best


def midpoint_by_patience(c, evaluations, run_log, master):
    """curriculum_midpoint="patience:<P>": j0 once the run's own target validation curve has turned
    (schedule.turn_by_patience), logged as a curriculum record; None before. Until then gamma_max(j)
    is 0; from then on Eq. (4) runs as it would with that j0 given by hand."""
    epochs, losses = zip(*evaluations)
    midpoint = turn_by_patience(epochs, losses,
                                int(c.curriculum_midpoint.removeprefix("patience:")))
    if midpoint is not None:
        run_log.write({"kind": "curriculum", "midpoint": midpoint, "found_at_epoch": epochs[-1]})
        if master:
            print(f"curriculum midpoint j0 = epoch {midpoint:.2f}, found at epoch {epochs[-1]:.2f}")
    return midpoint


def refresh_online_scores(scores, step_entropies, cluster):
    """score_source="online", after each step: the windows of that step take their fresh entropies
    (dropout.refresh_scores). The ranks exchange theirs, so that all hold the same scores: a
    window's next visit may fall to another rank. step_entropies: per micro-batch (sample_index,
    entropy, fill_mask)."""
    sample_index, entropy, fill_mask = (torch.cat(parts) for parts in zip(*step_entropies))
    sample_index, fill_mask = (sample_index.to(entropy.device),
                               fill_mask.to(entropy.device, torch.uint8))
    if cluster.distributed:  # every rank holds as many rows as any other
        sample_index, entropy, fill_mask = (gather_from_all_ranks(t, cluster.world_size)
                                            for t in (sample_index, entropy, fill_mask))
    refresh_scores(scores, sample_index.cpu(), entropy.float().cpu(), fill_mask.bool().cpu())


def main(argv):
    c = parse_config(argv)
    cluster = start(c.device)
    validate(c, cluster)
    out_dir, ckpt_dir = Path(c.out_dir), Path(c.out_dir) / "ckpt"
    master, device = cluster.master, cluster.device
    bf16 = c.dtype == "bfloat16" or (c.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    claim_out_dir(out_dir, cluster)
    resumed = earlier_run(c, ckpt_dir, master)
    if resumed == "finished":
        return
    if master:
        print("config:", json.dumps(asdict(c)))
    dropping, online = c.method in TOKEN_DROPOUT_METHODS, c.score_source == "online"
    # j0, read once: a resumed run keeps its midpoint, whatever its baseline folder holds now.
    midpoint = (resumed["midpoint"] if resumed else curriculum_midpoint(c)) if dropping else None

    tokenizer, model = load_model(c, device)
    loader, sets = load_data(c, tokenizer, model.config.vocab_size, cluster)
    max_steps = c.max_steps or loader.steps_for_epochs(c.epochs)
    train_model = wrap(model, c.parallel, cluster, c.compile, bf16)  # FSDP shards `model` itself
    optimizer = make_optimizer(model, c, device)
    scores, sets.groups = base_entropies(c, model, cluster, autocast)
    if online:  # the base model's scores (resumed: its own) in float32: float16 ties close ones
        scores = resumed["online_scores"] if resumed else scores.float()
    best, evaluations = restore_training_state(resumed, ckpt_dir, model, optimizer, loader, master)
    run_log = start_log(c, out_dir, master, resumed, midpoint)

    # ---- the loop
    accumulation = c.global_batch_size // (c.micro_batch_size * cluster.world_size)
    targeting = "all" if c.method == "token_dropout" else c.targeting
    last_epoch = math.floor(loader.epoch)
    resumed_step = saved_step = loader.step if resumed else None  # evaluated before that save
    # MFU: tokens/s over what the GPUs' datasheet peak would give (known GPUs only)
    peak = peak_flops(device) if bf16 else None
    peak_tokens_per_sec = (peak * cluster.world_size / model.flops_per_token(c.seq_len) if peak
                           else None)
    try:
        while True:
            step, epoch = loader.step, loader.epoch
            epoch_end = math.floor(epoch) > last_epoch
            due = (step in (0, max_steps) or epoch_end
                   or (c.eval_interval and step % c.eval_interval == 0))
            if due and step != resumed_step:
                at = {"step": step, "epoch": epoch, "epoch_end": epoch_end,
                      "last": step == max_steps}
                best = evaluate_and_export(model, c, sets, tokenizer, cluster, autocast, at, best,
                                           evaluations, run_log)
                if dropping and midpoint is None:  # curriculum_midpoint="patience:P"
                    midpoint = midpoint_by_patience(c, evaluations, run_log, master)
                last_epoch = math.floor(epoch)
            if step == max_steps or (step > 0 and step % c.checkpoint_interval == 0):
                with interrupts_held():  # a save is completed, not cut
                    save_training_state(ckpt_dir, model, optimizer, {
                        "loader": loader.state_dict(), "best": best, "config": asdict(c),
                        "log_lines": run_log.lines, "finished": step == max_steps,
                        "midpoint": midpoint, "evaluations": evaluations,
                        "online_scores": scores if online else None}, cluster)
                    saved_step = step
            if step == max_steps:
                break

            # one optimizer step: gamma_j once per step (Sec. 3.1), masks keyed by each row's window
            step_start = time.time()
            # hidden dropout: seeded by (seed, step, rank), so a resumed run draws as a whole one
            torch.manual_seed(seed_for(c.seed, step, HIDDEN_DROPOUT, cluster.rank))
            j = epoch if c.curriculum_unit == "epoch" else step
            ceiling = gamma_max_at(j, c.gamma_max, c.curriculum_sharpness, midpoint, c.curriculum) \
                if dropping and midpoint is not None else 0.0
            gamma = draw_gamma(c.seed, step, ceiling)
            lr = learning_rate_at(step, c.learning_rate, c.min_lr, c.warmup_steps, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = torch.zeros(3, device=device, dtype=torch.float64)  # loss, masked, targets
            step_entropies = []  # score_source="online": (sample_index, entropy, fill_mask)
            for micro, batch in enumerate(loader.next_batch()):
                inputs, targets = to_device(batch.inputs, device), to_device(batch.targets, device)
                target_rows, fill_mask, noise = batch.target_rows, None, None
                if dropping:
                    rows = row_scores(scores, batch.sample_index, target_rows, c.seq_len)
                    fill_mask = to_device(token_dropout_mask(rows, target_rows, batch.sample_index,
                                                             c.seed, step, gamma, targeting,
                                                             c.gate_percentile), device)
                    stats[1] += fill_mask.sum()
                if c.method == "neftune":
                    lengths = torch.full((len(inputs),), c.seq_len)  # windows are never padded
                    noise = neftune_noise((*inputs.shape, model.config.hidden_size),
                                          batch.sample_index, lengths, c.neftune_alpha, c.seed,
                                          step, device)
                stats[2] += target_rows.sum() * c.seq_len
                set_gradient_sync(train_model, micro == accumulation - 1)  # last micro-step only
                # the fill (Eq. 1) happens in the model, at the positions of fill_mask
                with autocast:
                    entropy, loss = train_model(inputs, targets, fill_mask=fill_mask,
                                                embedding_noise=noise, with_entropy=online)
                if online:
                    step_entropies.append((batch.sample_index, entropy.detach(), fill_mask))
                # summed over micro-steps and averaged over ranks (DDP, FSDP): the batch's mean
                (loss / accumulation).backward()
                stats[0] += loss.detach()
            if online:
                refresh_online_scores(scores, step_entropies, cluster)
            if cluster.distributed:
                dist.all_reduce(stats)
            train_loss = stats[0].item() / (accumulation * cluster.world_size)
            grad_norm = clip_gradients(model, c.grad_clip)
            if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):  # weights untouched
                raise TrainingStopped(non_finite_message(step, train_loss, grad_norm, ckpt_dir,
                                                         saved_step))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_per_sec = c.global_batch_size * c.seq_len / (time.time() - step_start)
            if (step + 1) % c.log_interval == 0:
                log_step(run_log, master, max_steps, {
                    "step": step + 1, "epoch": loader.epoch, "lr": lr, "gamma_max_j": ceiling,
                    "gamma": gamma, "mask_rate": stats[1].item() / max(1.0, stats[2].item()),
                    "train_loss": train_loss, "grad_norm": grad_norm,
                    "tokens_per_sec": tokens_per_sec,
                    "mfu": tokens_per_sec / peak_tokens_per_sec if peak else None})
    except KeyboardInterrupt:
        raise TrainingStopped(interrupted_message(loader.step, saved_step)) from None
    if master:
        print(f"done: best target val loss {best['val_loss']:.4f} at epoch {best['epoch']:.2f}; "
              f"exported to {out_dir / 'best'}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError, TrainingStopped) as e:
        # every rank stops alike
        if int(os.environ.get("RANK", 0)) == 0 or not isinstance(e, TrainingStopped):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before the first step: the loop reports its own interrupts
        if int(os.environ.get("RANK", 0)) == 0:
            print("error: interrupted before training began; no step is lost: run the same command "
                  "again (with --resume=True if it was resuming)", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            # The DDP wrapper sits in a reference cycle that holds the process group, and a group
            # left to the interpreter's exit can abort the process (gloo): free both while Python
            # is alive.
            gc.collect()
            dist.destroy_process_group()
