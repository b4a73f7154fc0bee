"""
Continual pre-training on scarce target data repeated for many epochs, mixed with general data,
with EntroDrop or any baseline of the paper; one process, or DDP under torchrun.

    python train.py                                     # the embedded CPU demo (after `make demo` made its inputs)
    python train.py --method=baseline --out_dir=out/demo/baseline
    torchrun --nproc_per_node=8 train.py config/qwen3_0.6b_math.py --method=entrodrop

Every setting is a field of Config below. A preset in config/ assigns some of them, and each
--key=value overrides one. The defaults are the CPU demo's continual pre-training run.
"""

import ast
import fcntl
import gc
import json
import math
import os
import runpy
import shutil
import socket
import sys
import time
import typing
from contextlib import nullcontext
from datetime import timedelta
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data.loader import MixtureLoader, load_meta, read_windows, verify_checksums
from dropout import TARGETING_MODES, draw_gamma, neftune_noise, token_dropout_mask
from entropy import build_entropy_cache, cache_header, default_cache_path, load_entropy_cache, token_entropies
from evaluate import FORMATS, read_problems, score
from model import ModelConfig, Transformer, replace_durably
from schedule import gamma_max_at, learning_rate_at, turning_epoch
from tokenizer import load_tokenizer

METHODS = ("baseline", "weight_decay", "hidden_dropout", "neftune", "token_dropout", "entrodrop")
TOKEN_DROPOUT_METHODS = ("token_dropout", "entrodrop")
TOKEN_DROPOUT_KEYS = {"gamma_max", "gate_percentile", "targeting", "score", "curriculum", "curriculum_sharpness",
                      "curriculum_midpoint", "curriculum_unit", "fill"}


@dataclass
class Config:
    # ---- model and data
    init_from: str = "out/demo/base/best"      # base model: a HF checkpoint folder, or "scratch"
    scratch_model: dict = field(default_factory=dict)  # init_from="scratch": ModelConfig fields of the new model
    tokenizer: str = "byte"                    # init_from="scratch" only; a checkpoint brings its own
    out_dir: str = "out/demo/entrodrop"        # checkpoints, log.jsonl, best/ (the exported best model)
    target_data: str = "out/demo/data/math"    # the scarce domain data, repeated for many epochs
    general_data: str = "out/demo/data/general"  # replay data, read once through
    entropy_cache: str = ""                    # "" = inside target_data, named by base model and seq_len
    target_ratio: float = 0.6                  # share of each batch's rows from the target data (6:4)
    seq_len: int = 256                         # tokens per row
    global_batch_size: int = 10                # rows per optimizer step, over all ranks
    micro_batch_size: int = 10                 # rows per forward pass; accumulation steps are derived
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
    gamma_max: float = 0.4                     # token dropout: ceiling of gamma_j ~ U(0, gamma_max(j)), Eq. (4);
                                               # the demo's; the paper (and the GPU presets) use 0.1
    gate_percentile: float = 0.5               # entrodrop: share of each row's tokens eligible, Eq. (2)
    targeting: str = "low"                     # entrodrop: "low" (EntroDrop), "high" or "random" (ablations)
    score: str = "entropy"                     # entrodrop: rank tokens by "entropy" or "nll" (confidence)
    curriculum: str = "sigmoid"                # token dropout: "sigmoid" (Eq. 4) or "constant" (fixed ratio)
    curriculum_sharpness: float = 1.0          # k of Eq. (4), per curriculum_unit
    curriculum_midpoint: float | str = 9.0     # j0 of Eq. (4), in curriculum_unit: where the baseline's
                                               # target val loss bottoms (Sec. 3.3); epoch 9 in the demo.
                                               # "auto:<folder>": read it off the baseline run(s) there
    curriculum_unit: str = "epoch"             # "epoch" (target epochs) or "step" (optimizer steps)
    fill: str = "mean"                         # token dropout: "mean" embedding (Eq. 1) or "zero" (A.3)
    neftune_alpha: float = 5.0                 # neftune: noise scale alpha / sqrt(L * d)
    dropout: float = 0.0                       # hidden_dropout: must be > 0; others: 0
    # ---- evaluation, logging, checkpoints
    eval_interval: int = 0                     # evaluate every this many steps (0: only at epoch ends)
    general_eval_windows: int = 64             # general validation windows per evaluation
    accuracy_problems: str = ""                # JSONL of problems: greedy-decoding accuracy (evaluate.py)
    accuracy_format: str = "embedded"          # their format: one of evaluate.FORMATS
    accuracy_samples: int = 0                  # how many of them per evaluation (0 = off)
    export_every: int = 0                      # also export the model every this many target epochs, and
                                               # at the end, to out_dir/epochs/<epoch>/ (0 = only best/)
    log_interval: int = 10                     # log a training record every this many steps
    checkpoint_interval: int = 100             # save out_dir/ckpt.pt every this many steps
    # ---- system
    seed: int = 1337
    device: str = "auto"                       # "auto", "cpu", "cuda"
    dtype: str = "auto"                        # "auto" (bfloat16 autocast on GPU, float32 on CPU), "float32", "bfloat16"
    compile: bool = False                      # torch.compile the model (helps on GPU)
    resume: bool = False                       # continue from out_dir/ckpt.pt if it exists


# The values each numeric setting may take, in interval notation; validate() checks them all, and
# NaN or an infinity never passes. (seed: numpy and torch take seeds below 2^64; rank is added.)
NUMBER_RANGES = {
    "target_ratio": "(0, 1]", "seq_len": "[1, inf)", "global_batch_size": "[1, inf)", "micro_batch_size": "[1, inf)",
    "epochs": "[0, inf)", "max_steps": "[0, inf)",
    "learning_rate": "(0, inf)", "min_lr": "[0, inf)", "warmup_steps": "[0, inf)", "weight_decay": "[0, inf)",
    "beta1": "[0, 1)", "beta2": "[0, 1)", "grad_clip": "[0, inf)",
    "gamma_max": "[0, 1]", "gate_percentile": "(0, 1]", "curriculum_sharpness": "(0, inf)",
    "curriculum_midpoint": "(-inf, inf)", "neftune_alpha": "[0, inf)", "dropout": "[0, 1)",
    "eval_interval": "[0, inf)", "general_eval_windows": "[0, inf)", "accuracy_samples": "[0, inf)",
    "export_every": "[0, inf)", "log_interval": "[1, inf)", "checkpoint_interval": "[1, inf)", "seed": "[0, 1e18]",
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
            raise ValueError(f"unknown config key {key!r}; the keys are the fields of Config in train.py")
        allowed = typing.get_args(types[key]) or (types[key],)  # float | str -> (float, str)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # 1 is a fine float
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join(t.__name__ for t in allowed)
            raise ValueError(f"config key {key!r} must be a {names}, got {value!r}")
        setattr(config, key, value)
    return config


def validate(c: Config, world_size):
    """Check every setting once, before anything is loaded; each error names the key."""
    def require(ok, message):
        if not ok:
            raise ValueError(message)
    require(c.method in METHODS, f"method={c.method!r} must be one of {METHODS}")
    require(c.targeting in TARGETING_MODES[:3], f"targeting={c.targeting!r} must be 'low', 'high' or 'random'")
    for key, allowed in (("score", ("entropy", "nll")), ("curriculum", ("sigmoid", "constant")),
                         ("curriculum_unit", ("epoch", "step")), ("fill", ("mean", "zero")),
                         ("device", ("auto", "cpu", "cuda")), ("dtype", ("auto", "float32", "bfloat16")),
                         ("accuracy_format", FORMATS)):
        require(getattr(c, key) in allowed, f"{key}={getattr(c, key)!r} must be one of {allowed}")
    for key, interval in NUMBER_RANGES.items():
        value = getattr(c, key)
        require(isinstance(value, str) or in_interval(value, interval),  # str: curriculum_midpoint="auto:..."
                f"{key}={value!r} is out of range: it must lie in {interval}")
    require(c.min_lr <= c.learning_rate, f"min_lr={c.min_lr} must not exceed learning_rate={c.learning_rate}")
    require(c.accuracy_samples == 0 or c.accuracy_problems,
            f"accuracy_samples={c.accuracy_samples} needs accuracy_problems: a JSONL file of problems to score")
    require(c.global_batch_size % (c.micro_batch_size * world_size) == 0,
            f"global_batch_size={c.global_batch_size} must be a multiple of micro_batch_size="
            f"{c.micro_batch_size} x {world_size} ranks")
    require(c.epochs > 0 or c.max_steps > 0, "set epochs > 0 or max_steps > 0")
    # Each baseline differs from `baseline` in exactly one knob, so the tables compare like with like.
    require((c.weight_decay > 0) == (c.method == "weight_decay"),
            f"weight_decay={c.weight_decay}: must be > 0 for method=weight_decay and 0 otherwise")
    require((c.dropout > 0) == (c.method == "hidden_dropout"),
            f"dropout={c.dropout}: must be > 0 for method=hidden_dropout and 0 otherwise")
    dropping = c.method in TOKEN_DROPOUT_METHODS
    require(not dropping or c.gamma_max > 0, f"method={c.method} needs gamma_max > 0")
    for key, default in (("targeting", "low"), ("score", "entropy"), ("curriculum", "sigmoid"), ("fill", "mean")):
        owner_ok = c.method == "entrodrop" if key in ("targeting", "score") else dropping
        require(getattr(c, key) == default or owner_ok,
                f"{key}={getattr(c, key)!r} is an option of token dropout methods, not of method={c.method}")
    require(c.score == "entropy" or c.targeting != "random", "score='nll' has no effect with targeting='random'")
    require(not isinstance(c.curriculum_midpoint, str) or
            (c.curriculum_midpoint.startswith("auto:") and c.curriculum_unit == "epoch"),
            f"curriculum_midpoint={c.curriculum_midpoint!r} must be a number, or 'auto:<baseline out_dir>' "
            "with curriculum_unit='epoch'")
    require(c.init_from != "scratch" or c.method in ("baseline", "weight_decay", "hidden_dropout"),
            f"method={c.method} perturbs inputs relative to a base model: init_from must be a checkpoint folder")


def curriculum_midpoint(c) -> float:
    """j0 of Eq. (4): the number given, or for "auto:<folder>" the turning epoch (schedule.py) of
    every baseline run whose log.jsonl lies under that folder, averaged over them (seeds)."""
    if not isinstance(c.curriculum_midpoint, str):
        return c.curriculum_midpoint
    folder = Path(c.curriculum_midpoint.removeprefix("auto:"))
    turns = []
    for log in sorted(folder.rglob("log.jsonl")):
        evals = [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "eval"]
        if evals:
            turns.append(turning_epoch([r["epoch"] for r in evals], [r["val_loss"] for r in evals]))
    if not turns:
        raise FileNotFoundError(f"curriculum_midpoint={c.curriculum_midpoint!r}: {folder} holds no log.jsonl with "
                                "evaluations; train the baseline there first")
    return sum(turns) / len(turns)


def evaluate(model, c, val, general_val, groups, problems, tokenizer, rank, world_size, autocast):
    """Target validation loss, overall and by the base model's entropy groups (Sec. 2, RQ3), general
    validation loss, and optionally answer accuracy. Batches are shared out across ranks."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(5, device=device, dtype=torch.float64)  # target, low, high, general, correct
    counts = torch.zeros(5, device=device, dtype=torch.float64)
    b = c.micro_batch_size
    with torch.no_grad(), autocast:
        for windows, slot in ((val, 0), (general_val, 3)):
            for start in range(rank * b, len(windows), world_size * b):
                nll = token_entropies(model, windows[start:start + b].to(device), return_nll=True)[1][:, 1:]
                sums[slot] += nll.sum()
                counts[slot] += nll.numel()
                if slot == 0 and groups is not None:
                    for j, where in enumerate(groups[start:start + b].to(device).unbind(1), start=1):
                        sums[j] += nll[where].sum()   # where (b, seq_len): the low or high group
                        counts[j] += where.sum()
        if problems:  # batched greedy decoding, scored by the rules of evaluate.py
            records = score(model, tokenizer, problems[rank::world_size], c.accuracy_format, shots=0,
                            max_new_tokens=256, batch_size=b, progress=False)
            sums[4] += sum(r["correct"] for r in records)
            counts[4] += len(records)
    if world_size > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    model.train()
    names = ("val_loss", "val_loss_low", "val_loss_high", "general_val_loss", "accuracy")
    return {name: (sums[j] / counts[j]).item() if counts[j] > 0 else None for j, name in enumerate(names)}


def entropy_groups(val_nll):
    """Fix the evaluation groups once, from the base model: over all validation targets, low-entropy =
    the 50% most confident tokens, high-entropy = the 25% least confident (Sec. 2, RQ3).
    val_nll (n, seq_len + 1) -> bool (n, 2, seq_len) masks over each window's targets."""
    nll = val_nll[:, 1:]
    rank = torch.empty(nll.numel(), dtype=torch.long)
    rank[nll.flatten().argsort(stable=True)] = torch.arange(nll.numel())
    rank = rank.view_as(nll)
    return torch.stack((rank < nll.numel() // 2, rank >= nll.numel() - nll.numel() // 4), dim=1)


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (a non-finite loss, an interrupt): one line for the user, no traceback."""


HELD_LOCKS = []  # the open lock file of this process's run (see lock_out_dir)


def lock_out_dir(out_dir: Path):
    """Hold an exclusive lock on out_dir until the run ends: the OS releases it when the process
    exits, SIGKILL included. A second run in the same folder, or an orphaned worker of a killed
    torchrun still writing there, then makes the next run fail at once, naming the holder."""
    for handle in HELD_LOCKS:  # an earlier main() of this process has ended (a notebook, the tests)
        handle.close()
    HELD_LOCKS.clear()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / ".lock", "a+")
    except OSError as e:  # a file of that name, no permission, a read-only disk
        raise ValueError(f"out_dir={out_dir} cannot be used ({e.strerror}); choose a folder that can be written") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"out_dir={out_dir} is in use by {holder}; wait for that run to end or stop it "
                         "(kill its pid), or choose another out_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{' '.join(sys.argv)}\n")
    handle.flush()
    HELD_LOCKS.append(handle)


def read_checkpoint(path):
    """The training state at path, memory-mapped (every rank reads the settings without copying the
    weights and optimizer state into memory), or a clear error for an empty or damaged file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # an empty file fails in mmap, a truncated one in the zip reader
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); it may be empty or "
                         "truncated: delete it to start this run over") from None


def save_checkpoint(path, state):
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, temporary)
    replace_durably(temporary, path)  # a crash mid-save leaves the previous checkpoint intact


def write_durably(path, text):
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    replace_durably(temporary, path)


def export(model, tokenizer, folder):
    """The model and its tokenizer as a Hugging Face folder, for lm-eval, OpenCompass, vLLM and
    evaluate.py. Written whole under a temporary name, then swapped in: a crash leaves the earlier
    export or the new one, never a mixture (the earlier one is moved aside and deleted last)."""
    folder = Path(folder)
    fresh, stale = (folder.with_name(f".{folder.name}.{kind}.{os.getpid()}") for kind in ("new", "old"))
    model.save_pretrained(fresh)
    tokenizer.save(str(fresh))
    if folder.exists():
        os.replace(folder, stale)
    replace_durably(fresh, folder)
    shutil.rmtree(stale, ignore_errors=True)


def peak_flops(device):
    """Dense bf16 peak of known GPUs from their datasheets, for MFU; None elsewhere."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    known = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
             ("A100", 312e12))
    return next((flops for key, flops in known if key in name), None)  # first match: "H100" alone is the SXM part


def main(argv):
    c = parse_config(argv)
    distributed = "RANK" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    validate(c, world_size)
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        # While rank 0 writes a checkpoint (16 bytes a parameter: 10 GB for Qwen3-0.6B, 128 GB for
        # 8B) the others wait in the next collective; NCCL's default 10 minutes can be too short.
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    master = rank == 0
    out_dir, ckpt_path = Path(c.out_dir), Path(c.out_dir) / "ckpt.pt"
    bf16 = c.dtype == "bfloat16" or (c.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # ---- out_dir: one run at a time; rank 0 holds the lock, and every rank stops if it cannot
    refusal = None
    if master:
        try:
            lock_out_dir(out_dir)
        except ValueError as e:
            refusal = str(e)
    if distributed:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal:
        raise ValueError(refusal)

    # ---- an earlier run in out_dir: reuse it if finished, resume it if asked, never overwrite it
    checkpoint = read_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if checkpoint is not None:
        # Only settings this run reads count: a moved folder or a token dropout knob of a baseline is no
        # change, nor the micro-batch (the same global batch, split otherwise: e.g. to fit another GPU).
        unread = {"resume", "out_dir", "micro_batch_size"} | \
            (set() if c.method in TOKEN_DROPOUT_METHODS else TOKEN_DROPOUT_KEYS)
        changed = {k for k, v in asdict(c).items() if k not in unread and checkpoint["config"].get(k) != v}
        if changed:
            raise ValueError(f"{ckpt_path} is a run with different settings ({', '.join(sorted(changed))}); "
                             "choose another out_dir or delete it")
        if checkpoint["finished"]:
            if master:
                print(f"{out_dir} already holds this finished run; reusing it")
            return
        if not c.resume:
            raise ValueError(f"{ckpt_path} holds an unfinished run: pass --resume=True to continue it, "
                             "or choose another out_dir")
    if master:
        print("config:", json.dumps(asdict(c)))
    # j0, read once: a resumed run keeps the midpoint it started with, whatever its baseline folder holds now.
    midpoint = None
    if c.method in TOKEN_DROPOUT_METHODS:
        midpoint = checkpoint["midpoint"] if checkpoint is not None and "midpoint" in checkpoint else curriculum_midpoint(c)

    # ---- model, tokenizer, data
    torch.manual_seed(c.seed)
    if c.init_from == "scratch":
        tokenizer = load_tokenizer(c.tokenizer)
        config = ModelConfig(**{"vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id,
                                **c.scratch_model, "dropout": c.dropout})
        model = Transformer(config).to(device)
    else:
        tokenizer = load_tokenizer(c.init_from)
        model = Transformer.from_pretrained(c.init_from, device=device, dropout=c.dropout)
    if c.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={c.seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    vocab_size = model.config.vocab_size
    for folder in (c.target_data, c.general_data):
        load_meta(folder, tokenizer, vocab_size)
    loader = MixtureLoader(c.target_data, c.general_data, c.seq_len, c.global_batch_size, c.micro_batch_size,
                           c.target_ratio, c.seed, rank, world_size, vocab_size)
    max_steps = c.max_steps or loader.steps_for_epochs(c.epochs)
    val = torch.from_numpy(read_windows(c.target_data, "val", c.seq_len, vocab_size=vocab_size))
    if len(val) == 0:
        raise ValueError(f"{c.target_data}/val.bin is shorter than one window of {c.seq_len + 1} tokens")
    general_val = torch.from_numpy(read_windows(c.general_data, "val", c.seq_len, vocab_size=vocab_size)
                                   [:c.general_eval_windows])
    if c.general_eval_windows and len(general_val) == 0:
        raise ValueError(f"{c.general_data}/val.bin is shorter than one window of {c.seq_len + 1} tokens, so no "
                         "general validation loss can be measured; prepare it with --val_share > 0, or set "
                         "general_eval_windows=0 to train without it")
    problems = read_problems(c.accuracy_problems, c.accuracy_format)[:c.accuracy_samples] if c.accuracy_samples else []

    # ---- the base model's entropies: computed once (all ranks), before any training
    scores, groups = None, None  # a model from scratch has no base model to measure entropy with
    if c.init_from != "scratch":
        header = cache_header(c.init_from, c.target_data, c.seq_len)
        cache_path = c.entropy_cache or default_cache_path(c.target_data, header["model"], c.seq_len)
        # The cache is keyed on the sha256 in meta.json, so the files must still have it: one read of
        # the target data (80 MB for the paper's 0.02B tokens: well under a second).
        verify_checksums(c.target_data)
        if not Path(cache_path).exists():
            with autocast:
                build_entropy_cache(model.eval(), c.target_data, c.seq_len, cache_path, header,
                                    c.micro_batch_size, rank, world_size)
            model.train()
        hint = (f"python entropy.py --init_from {c.init_from} --target_data {c.target_data} "
                f"--seq_len {c.seq_len} --entropy_cache {cache_path}")
        cache = load_entropy_cache(cache_path, header, hint)
        scores, groups = cache[f"train_{c.score}"], entropy_groups(cache["val_nll"])
    if c.fill == "zero":
        model.fill_embedding.zero_()  # Appendix A.3's unstable alternative, for the ablation

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=c.learning_rate, betas=(c.beta1, c.beta2), fused=device.type == "cuda")
    best = {"val_loss": math.inf, "epoch": None, "step": None}
    log_lines = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        loader.load_state_dict(checkpoint["loader"])
        best, log_lines = checkpoint["best"], checkpoint["log_lines"]
        torch.set_rng_state(checkpoint["rng"][rank]["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng"][rank]["cuda"], device)
        if master:
            print(f"resuming from {ckpt_path} at step {loader.step}")
    else:
        torch.manual_seed(c.seed + rank)  # hidden dropout differs across ranks, as their rows do
    log_path = out_dir / "log.jsonl"
    if master:
        write_durably(out_dir / "config.json", json.dumps(asdict(c), indent=1) + "\n")
        lines = log_path.read_text().splitlines(keepends=True)[:log_lines] if checkpoint else []
        write_durably(log_path, "".join(lines))  # drop records written after the checkpoint
    raw_model = model
    if c.compile:
        model = torch.compile(model)
    if distributed:
        # Gradients as views into the all-reduce buckets: one copy of them per GPU instead of two.
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True)

    def to_device(tensor):
        """To the GPU from page-locked memory without blocking: a copy from ordinary memory would
        wait for all queued GPU work, leaving the GPU idle while the next micro-batch is prepared."""
        return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor

    def log(record):
        nonlocal log_lines
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        log_lines += 1

    if checkpoint is None:
        log({"kind": "config", **asdict(c)})
        if isinstance(c.curriculum_midpoint, str) and midpoint is not None:
            log({"kind": "curriculum", "midpoint": midpoint})
            if master:
                print(f"curriculum midpoint j0 = epoch {midpoint:.2f}, from {c.curriculum_midpoint}")

    # ---- the loop
    accumulation = c.global_batch_size // (c.micro_batch_size * world_size)
    dropping = c.method in TOKEN_DROPOUT_METHODS
    targeting = "all" if c.method == "token_dropout" else c.targeting
    last_epoch = math.floor(loader.epoch)
    resumed_step = loader.step if checkpoint is not None else None  # evaluated before that checkpoint was saved
    saved_step = resumed_step  # the step of the newest checkpoint
    flops_per_token, peak = raw_model.flops_per_token(c.seq_len), peak_flops(device) if bf16 else None
    try:
        while True:
            step, epoch = loader.step, loader.epoch
            epoch_end = math.floor(epoch) > last_epoch
            due = step == 0 or step == max_steps or epoch_end or (c.eval_interval and step % c.eval_interval == 0)
            if due and step != resumed_step:
                results = evaluate(raw_model, c, val, general_val, groups, problems, tokenizer, rank, world_size, autocast)
                if results["val_loss"] < best["val_loss"]:
                    best = {"val_loss": results["val_loss"], "epoch": epoch, "step": step}
                    if master:  # the best model so far, ready for lm-eval / OpenCompass / vLLM
                        export(raw_model, tokenizer, out_dir / "best")
                if master and c.export_every and (step == max_steps or (epoch_end and math.floor(epoch) % c.export_every == 0)):
                    # Named by whole target epochs; a run stopped by max_steps mid-epoch ends with e.g. 3.40.
                    export(raw_model, tokenizer, out_dir / "epochs" / (str(math.floor(epoch)) if epoch_end else f"{epoch:.2f}"))
                log({"kind": "eval", "step": step, "epoch": epoch, **results,
                     "best_val_loss": best["val_loss"], "best_epoch": best["epoch"]})
                if master:
                    print(f"eval step {step} epoch {epoch:.2f}: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in results.items() if v is not None) +
                        f", best {best['val_loss']:.4f} at epoch {best['epoch']:.2f}")
                last_epoch = math.floor(epoch)
            if step == max_steps or (step > 0 and step % c.checkpoint_interval == 0):
                rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
                all_rng = [None] * world_size
                if distributed:
                    dist.all_gather_object(all_rng, rng)
                else:
                    all_rng = [rng]
                if master:
                    save_checkpoint(ckpt_path, {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                                "loader": loader.state_dict(), "rng": all_rng, "best": best,
                                                "config": asdict(c), "log_lines": log_lines, "finished": step == max_steps,
                                                "midpoint": midpoint})
                saved_step = step
            if step == max_steps:
                break

            # one optimizer step: gamma_j once per step (Sec. 3.1), masks keyed by each row's window
            step_start = time.time()
            j = epoch if c.curriculum_unit == "epoch" else step
            ceiling = gamma_max_at(j, c.gamma_max, c.curriculum_sharpness, midpoint, c.curriculum) if dropping else 0.0
            gamma = draw_gamma(c.seed, step, ceiling)
            lr = learning_rate_at(step, c.learning_rate, c.min_lr, c.warmup_steps, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, masked tokens, target tokens
            for micro, batch in enumerate(loader.next_batch()):
                inputs, targets, target_rows = to_device(batch.inputs), to_device(batch.targets), batch.target_rows
                fill_mask = noise = None
                if dropping:
                    rows = scores[batch.sample_index.clamp(min=0), :c.seq_len]  # (b, seq_len) from the cache
                    rows[~target_rows] = math.nan                               # general rows: never gated
                    fill_mask = to_device(token_dropout_mask(rows, target_rows, batch.sample_index, c.seed, step, gamma,
                                                             targeting, c.gate_percentile))
                    stats[1] += fill_mask.sum()
                if c.method == "neftune":
                    lengths = torch.full((len(inputs),), c.seq_len)  # windows are never padded
                    noise = neftune_noise((*inputs.shape, raw_model.config.hidden_size), batch.sample_index,
                                          lengths, c.neftune_alpha, c.seed, step, device)
                stats[2] += target_rows.sum() * c.seq_len
                if distributed:  # synchronize gradients only on the last micro-step
                    model.require_backward_grad_sync = micro == accumulation - 1
                with autocast:
                    _, loss = model(inputs, targets, fill_mask=fill_mask, embedding_noise=noise)
                # Each micro-batch's loss is a mean over its tokens; dividing by the number of micro-steps
                # makes the summed gradients the mean over the whole global batch (DDP averages ranks).
                (loss / accumulation).backward()
                stats[0] += loss.detach()
            if distributed:
                dist.all_reduce(stats)
            train_loss = stats[0].item() / (accumulation * world_size)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip or math.inf).item()
            if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):  # stop before the weights are hit
                kept = f"{ckpt_path} (step {saved_step}) is intact" if saved_step is not None else "no checkpoint was saved yet"
                raise TrainingStopped(f"non-finite training at step {step} (loss {train_loss}, gradient norm {grad_norm}); "
                                      f"stopped before the weights changed, and {kept}. Lower learning_rate, or check the data")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_per_sec = c.global_batch_size * c.seq_len / (time.time() - step_start)
            if (step + 1) % c.log_interval == 0:
                log({"kind": "train", "step": step + 1, "epoch": loader.epoch, "lr": lr, "gamma_max": ceiling,
                     "gamma": gamma, "mask_rate": stats[1].item() / max(1.0, stats[2].item()), "train_loss": train_loss,
                     "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
                     "mfu": flops_per_token * tokens_per_sec / (peak * world_size) if peak else None})
                if master:
                    print(f"step {step + 1}/{max_steps} epoch {loader.epoch:.2f} loss {train_loss:.4f} lr {lr:.2e} "
                          f"gamma_max {ceiling:.3f} grad_norm {grad_norm:.3f} {tokens_per_sec:,.0f} tok/s")
    except KeyboardInterrupt:
        since = f"since the checkpoint at step {saved_step} will be redone with --resume=True" if saved_step is not None \
            else "are lost: no checkpoint was saved yet"
        raise TrainingStopped(f"interrupted at step {loader.step}; the {loader.step - (saved_step or 0)} steps {since}") \
            from None
    if master:
        print(f"done: best target val loss {best['val_loss']:.4f} at epoch {best['epoch']:.2f}; "
              f"exported to {out_dir / 'best'}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError, TrainingStopped) as e:
        if int(os.environ.get("RANK", 0)) == 0 or not isinstance(e, TrainingStopped):  # every rank stops alike
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            # The DDP wrapper sits in a reference cycle that holds the process group, and a group left
            # to the interpreter's exit can abort the process (gloo): free both while Python is alive.
            gc.collect()
            dist.destroy_process_group()
