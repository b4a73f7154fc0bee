"""
The on-disk token format, and the loader that mixes scarce target data with general data.

Format of a data folder:
    train.bin, val.bin   uint32 token ids (Qwen's ids do not fit in uint16), each document
                         followed by the tokenizer's end-of-text token
    meta.json            the tokenizer's identity (fingerprint, eos id, vocab size), token and
                         document counts, checksums, and where the text came from
Files are written under temporary names and renamed, meta.json last, so a folder with a
meta.json is complete.

The loader cuts the target stream into windows of seq_len + 1 tokens (inputs and next-token
targets). Window i starts at token i * seq_len, so every token is predicted once per epoch, and
i is the window's stable sample index: cached entropies are looked up by it. Each optimizer
step takes a global batch of rows, target_ratio of them from the target set (in a fresh order
each epoch) and the rest from the general set (read once through, without repetition). The
batch is then split across DDP ranks and micro-batches, so that the same global batch is seen
whatever the number of ranks. All state is three counters, so resuming is exact.
"""

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from model import replace_durably

FORMAT = "entrodrop-tokens-v1"


class DatasetWriter:
    """Streams documents into folder/{split}.bin and writes meta.json on a clean exit:

        with DatasetWriter(folder, tokenizer, source={...}) as writer:
            writer.add("train", tokenizer.encode(text))

    Nothing is renamed into place unless every document was written; a failed write changes
    nothing."""

    def __init__(self, folder, tokenizer, source: dict, splits=("train", "val")):
        self.folder, self.tokenizer, self.source, self.splits = \
            Path(folder), tokenizer, source, splits
        self.files, self.counts = {}, {}

    def _temporary(self, name):
        return self.folder / f"{name}.{os.getpid()}.tmp"  # the pid: two writers never share a file

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        for split in self.splits:
            self.files[split] = open(self._temporary(f"{split}.bin"), "wb")
            self.counts[split] = {"tokens": 0, "documents": 0, "max_token_id": -1,
                                  "digest": hashlib.sha256()}
        return self

    def add(self, split, ids):
        # The document, then end-of-text.
        tokens = np.array([*ids, self.tokenizer.eos_id], dtype=np.uint32)
        data = tokens.tobytes()
        self.files[split].write(data)
        c = self.counts[split]
        c["tokens"] += len(tokens)
        c["documents"] += 1
        c["max_token_id"] = max(c["max_token_id"], int(tokens.max()))
        c["digest"].update(data)

    def __exit__(self, error_type, *_):
        for f in self.files.values():
            f.close()
        if error_type is not None:
            # A failed write leaves the folder as it was: an earlier complete dataset stays usable.
            for split in self.files:
                self._temporary(f"{split}.bin").unlink()
            return
        # The old meta.json goes before the new token files arrive: no reader may pair the two.
        (self.folder / "meta.json").unlink(missing_ok=True)
        for split in self.files:
            replace_durably(self._temporary(f"{split}.bin"), self.folder / f"{split}.bin")
        t = self.tokenizer
        splits = {split: {**{k: v for k, v in c.items() if k != "digest"},
                          "sha256": c["digest"].hexdigest()}
                  for split, c in self.counts.items()}
        meta = {"format": FORMAT, "source": self.source, "splits": splits,
                "tokenizer": {"name": t.name, "fingerprint": t.fingerprint, "eos_id": t.eos_id,
                              "vocab_size": t.vocab_size}}
        self._temporary("meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        replace_durably(self._temporary("meta.json"), self.folder / "meta.json")


PREPARE_AGAIN = "prepare the data again (python data/prepare.py or python data/embedded.py)"

# Every key that a reader of meta.json takes, what it must hold, and the test of that: a file that
# parses but was edited by hand or written by another program is refused by key where it is read,
# not met later as a KeyError or TypeError by whichever reader takes the key first.
META_KEYS = {
    "source": ("an object", lambda v: isinstance(v, dict)),
    "splits.train": ("an object", lambda v: isinstance(v, dict)),
    "splits.val": ("an object", lambda v: isinstance(v, dict)),
    "tokenizer.name": ("a string", lambda v: isinstance(v, str)),
    "tokenizer.fingerprint": ("a string", lambda v: isinstance(v, str)),
}
# The same for each split; `type(v) is int` because json's true and false are ints to isinstance.
SPLIT_KEYS = {
    "tokens": ("a whole number >= 0", lambda v: type(v) is int and v >= 0),
    "documents": ("a whole number >= 0", lambda v: type(v) is int and v >= 0),
    "max_token_id": ("a whole number >= -1", lambda v: type(v) is int and v >= -1),
    "sha256": ("64 lowercase hex digits",
               lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None),
}


def check_meta_shape(path, meta: dict):
    """Raise a ValueError naming the first key of META_KEYS or SPLIT_KEYS (as splits.train.tokens)
    that meta lacks or holds a value of the wrong kind in."""
    splits = meta.get("splits") if isinstance(meta.get("splits"), dict) else {}
    rules = {**META_KEYS, **{f"splits.{split}.{key}": rule
                             for split in splits for key, rule in SPLIT_KEYS.items()}}
    for name, (expected, valid) in rules.items():
        keys, value = name.split("."), meta
        for depth, key in enumerate(keys):
            if not isinstance(value, dict):  # e.g. "tokenizer": "byte"
                raise ValueError(f"{path}: {'.'.join(keys[:depth])} is {value!r}, expected an "
                                 f"object; {PREPARE_AGAIN}")
            if key not in value:
                raise ValueError(f"{path} has no {'.'.join(keys[:depth + 1])!r} (expected "
                                 f"{expected if depth == len(keys) - 1 else 'an object'}); "
                                 f"{PREPARE_AGAIN}")
            value = value[key]
        if not valid(value):
            raise ValueError(f"{path}: {name} is {value!r}, expected {expected}; {PREPARE_AGAIN}")


def load_meta(folder, tokenizer=None, vocab_size=None) -> dict:
    """Read folder/meta.json, and check its shape, the data against it (file sizes) and it against
    the model's tokenizer and vocabulary. Every reader of meta.json goes through here."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: prepare the data first "
                                "(python data/prepare.py ... or python data/embedded.py ...)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a valid meta.json ({type(e).__name__}: {e}); "
                         f"{PREPARE_AGAIN}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a JSON {type(meta).__name__}, expected an object; "
                         f"{PREPARE_AGAIN}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; "
                         f"{PREPARE_AGAIN}")
    check_meta_shape(path, meta)
    for split in ("train", "val"):
        file, size = Path(folder) / f"{split}.bin", 4 * meta["splits"][split]["tokens"]
        if not file.is_file() or file.stat().st_size != size:
            found = f"{file.stat().st_size:,} bytes" if file.is_file() else "no file"
            raise ValueError(f"{file}: meta.json records {size // 4:,} tokens ({size:,} bytes), "
                             f"found {found}; the file was truncated or replaced: "
                             f"{PREPARE_AGAIN}")
    if tokenizer is not None and meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
        raise ValueError(f"{folder} was tokenized with {meta['tokenizer']['name']!r}, whose "
                         f"vocabulary differs from the model's tokenizer ({tokenizer.name!r}); "
                         "prepare it again with --tokenizer pointing at the model's checkpoint "
                         "folder")
    if vocab_size is not None:
        for split, counts in meta["splits"].items():
            if counts["max_token_id"] >= vocab_size:
                raise ValueError(f"{folder}/{split}.bin holds token id {counts['max_token_id']}, "
                                 f"but the model's vocabulary has {vocab_size} rows; prepare the "
                                 "data with the model's tokenizer")
    return meta


def verify_checksums(folder):
    """Hash train.bin and val.bin against the sha256 in meta.json: same-sized files with other
    tokens pass every other check. Reads every byte once (a few hundred MB/s on a CPU core)."""
    meta = load_meta(folder)
    for split in ("train", "val"):
        file = Path(folder) / f"{split}.bin"
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        if digest.hexdigest() != meta["splits"][split]["sha256"]:
            raise ValueError(f"{file} does not match the sha256 in its meta.json: the file changed "
                             "after it was prepared; prepare the data again")


def read_windows(folder, split, seq_len, indices=None, vocab_size=None) -> np.ndarray:
    """(n, seq_len + 1) int64 windows of folder/{split}.bin; all of them, or those at `indices`.
    With vocab_size, a token id outside the model's vocabulary is an error that names the file
    (it would index past the embedding: an IndexError on a CPU, a device-side assert on a GPU)."""
    # A fresh memmap per call: holding one open across a long run leaks memory (as nanoGPT notes).
    path = Path(folder) / f"{split}.bin"
    # numpy cannot map an empty file, and an empty split (val_share 0) simply has no windows.
    tokens = (np.memmap(path, dtype=np.uint32, mode="r") if path.stat().st_size
              else np.zeros(0, np.uint32))
    if indices is None:
        indices = range(count_windows(len(tokens), seq_len))
    rows = [tokens[i * seq_len:(i + 1) * seq_len + 1] for i in indices]
    # A split shorter than one window gives (0, seq_len + 1), for the caller to check, rather
    # than a numpy error.
    windows = np.stack(rows).astype(np.int64) if rows else np.zeros((0, seq_len + 1), np.int64)
    if vocab_size is not None and windows.size and windows.max() >= vocab_size:
        row = int(np.argmax(windows.max(axis=1) >= vocab_size))
        raise ValueError(f"{path} holds token id {int(windows[row].max())} in window "
                         f"{list(indices)[row]}, but the model's vocabulary has {vocab_size} rows; "
                         "prepare the data again with the model's tokenizer")
    return windows


def count_windows(n_tokens, seq_len) -> int:
    return max(0, (n_tokens - 1) // seq_len)


@dataclass
class Batch:
    inputs: torch.Tensor        # (b, seq_len) int64
    targets: torch.Tensor       # (b, seq_len) int64, inputs shifted by one
    sample_index: torch.Tensor  # (b,) target window index; -1 on general rows
    target_rows: torch.Tensor   # (b,) bool, True where the row comes from the target set


class MixtureLoader:
    def __init__(self, target_dir, general_dir, seq_len, global_batch_size, micro_batch_size,
                 target_ratio, seed, rank=0, world_size=1, vocab_size=None):
        self.target_dir, self.general_dir, self.seq_len, self.seed = \
            target_dir, general_dir, seq_len, seed
        self.vocab_size = vocab_size  # each window read is checked against it
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of "
                             f"micro_batch_size={micro_batch_size} x {world_size} ranks; "
                             "change one of them")
        if not 0.0 < target_ratio <= 1.0:
            raise ValueError(f"target_ratio={target_ratio} must be in (0, 1]")
        # Exact arithmetic: with 0.6 * 512 = 307.2 target rows per step, the rows are handed out so
        # that after any step the count is floor(step * 307.2), never drifting from the ratio.
        self.target_per_step = Fraction(str(target_ratio)) * global_batch_size
        self.n_target = count_windows(load_meta(target_dir)["splits"]["train"]["tokens"], seq_len)
        if self.n_target == 0:
            raise ValueError(f"{target_dir}/train.bin is shorter than one window of seq_len + 1 = "
                             f"{seq_len + 1} tokens; use a smaller seq_len or more target data")
        self.n_general = count_windows(load_meta(general_dir)["splits"]["train"]["tokens"],
                                       seq_len) if target_ratio < 1.0 else 0
        if target_ratio < 1.0 and self.n_general == 0:
            raise ValueError(f"{general_dir}/train.bin is shorter than one window of "
                             f"{seq_len + 1} tokens")
        self.step, self.target_seen, self.general_seen = 0, 0, 0
        self._orders = {}

    @property
    def epoch(self) -> float:
        """Target epochs completed: passes over the target set, counted exactly."""
        return self.target_seen / self.n_target

    def steps_for_epochs(self, epochs) -> int:
        """The first step count after which `epochs` full passes over the target set are done."""
        # Windows are whole: 0.5 epoch of 23 windows needs 12 of them, so round the window count up
        # first (else 2 steps of 5.9 rows, 11.8 >= 11.5, would count as enough with only 11 taken).
        return math.ceil(math.ceil(Fraction(str(epochs)) * self.n_target) / self.target_per_step)

    def _order(self, source, n, n_pass):
        """Window order of one pass over a source: a permutation drawn from (seed, source, pass)."""
        # Keep only the current pass of each source.
        if self._orders.get(source, (None,))[0] != n_pass:
            permutation = lambda p: np.random.default_rng([self.seed, source, p]).permutation(n)
            order = permutation(n_pass)
            # A step that straddles two passes must not take a window twice: windows among the
            # last k of the previous pass (k = most rows a step takes from this source) move back
            # within the first 2k of this one. Only the first 2k positions change, so with n >= 3k
            # every pass still ends with its own permutation's tail, and no pass depends on more
            # than the one before it.
            k = (math.ceil(self.target_per_step) if source == 0
                 else self.global_batch_size - math.floor(self.target_per_step))
            if n_pass > 0 and n >= 3 * k:
                front = order[:2 * k]
                clash = np.isin(front, permutation(n_pass - 1)[-k:])
                order[:2 * k] = np.concatenate((front[~clash], front[clash]))
            self._orders[source] = (n_pass, order)
        return self._orders[source][1]

    def _take(self, source, n, seen, count):
        """Window indices number seen .. seen + count - 1 of a source's stream of passes."""
        out = []
        for position in range(seen, seen + count):
            n_pass, offset = divmod(position, n)
            if source == 1 and offset == 0 and n_pass > 0 and self.rank == 0:
                print(f"note: general data {self.general_dir} exhausted after {n_pass} pass(es); "
                      "reading it again in a new order (more general data avoids repetition)",
                      file=sys.stderr)
            out.append(self._order(source, n, n_pass)[offset])
        return out

    def next_batch(self) -> list[Batch]:
        """This rank's share of the next global batch, as a list of micro-batches."""
        G = self.global_batch_size
        n_target_rows = (math.floor((self.step + 1) * self.target_per_step)
                         - math.floor(self.step * self.target_per_step))
        # Spread the target rows evenly through the batch: each rank and micro-batch gets its share.
        is_target = [(i + 1) * n_target_rows // G > i * n_target_rows // G for i in range(G)]
        target_ids = iter(self._take(0, self.n_target, self.target_seen, n_target_rows))
        general_ids = iter(self._take(1, self.n_general, self.general_seen, G - n_target_rows))
        rows = [(True, next(target_ids)) if t else (False, next(general_ids)) for t in is_target]
        self.step, self.target_seen, self.general_seen = \
            self.step + 1, self.target_seen + n_target_rows, self.general_seen + G - n_target_rows

        per_rank = G // self.world_size
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        batches = []
        for start in range(0, per_rank, self.micro_batch_size):
            chunk = mine[start:start + self.micro_batch_size]
            windows = np.empty((len(chunk), self.seq_len + 1), dtype=np.int64)
            target_mask = np.array([t for t, _ in chunk])
            for flag, folder in ((True, self.target_dir), (False, self.general_dir)):
                where = np.flatnonzero(target_mask == flag)
                if len(where):
                    windows[where] = read_windows(folder, "train", self.seq_len,
                                                  [chunk[j][1] for j in where], self.vocab_size)
            windows = torch.from_numpy(windows)
            sample_index = torch.tensor([i if t else -1 for t, i in chunk])
            batches.append(Batch(windows[:, :-1], windows[:, 1:], sample_index,
                                 torch.from_numpy(target_mask)))
        return batches

    def state_dict(self) -> dict:
        return {"step": self.step, "target_seen": self.target_seen,
                "general_seen": self.general_seen}

    def load_state_dict(self, state):
        self.step, self.target_seen, self.general_seen = \
            state["step"], state["target_seen"], state["general_seen"]
