"""The data pipeline: JSONL preparation (data/prepare.py), the token format and its checks, the
mixture loader (data/loader.py), and the CPU demo's embedded data (data/embedded.py).

Prepared folders are decoded back and compared with the documents each format promises; the
loader is run on small random token folders whose every window is known, and its batches are
checked window by window: epochs, the target share, ranks, micro-batches and resuming."""

import hashlib
import json
import math
import random
import re
import unicodedata
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from data import prepare
from data.embedded import format_problem, make_splits, write_demo_data
from data.loader import (Batch, DatasetWriter, MixtureLoader, load_meta, read_windows,
                         verify_checksums)
from tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")
SEQ_LEN = 8
N_TARGET, N_GENERAL = 23, 40  # windows of SEQ_LEN + 1 tokens in the loader's two folders
FIELDS = ("inputs", "targets", "sample_index", "target_rows")
QWEN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def write_jsonl(path, records):
    # Unescaped unicode, as most exporters write it: U+2028 and U+0085 then sit raw inside a line.
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def run_prepare(input_path, out, *args, tokenizer="byte", val_share="0"):
    prepare.main(["--input", str(input_path), "--tokenizer", str(tokenizer), "--out", str(out),
                  "--val_share", val_share, *args])
    return out


def tokens_of(folder, split):
    return np.fromfile(folder / f"{split}.bin", dtype=np.uint32)


def split_documents(tokens, eos_id):
    """The id lists of the documents in a token file: each one ends with eos."""
    assert len(tokens) and tokens[-1] == eos_id, "the last document is not closed by end-of-text"
    ends = np.flatnonzero(tokens == eos_id)
    return [tokens[start:end] for start, end in zip([0, *(ends[:-1] + 1)], ends)]


def decoded(folder, split, tokenizer):
    return [tokenizer.decode(ids)
            for ids in split_documents(tokens_of(folder, split), tokenizer.eos_id)]


def files_in(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def gsm8k_records(n):
    rng = random.Random(7)
    pieces = ["Äpfel kosten", "naïve café", "李华有", "😀👍🏽 emoji",
              "Ελληνικά", "3.14159", "1,000,000", "½ cup", "١٢٣",
              'a "quoted" \\ backslash', "tab\there", "mentions <|endoftext|> in text",
              "line\u2028separator", "next\x85line", "crlf\r\nend", "  leading spaces", "Straße"]
    records = []
    for i in range(n):
        question = f"#{i}: {rng.choice(pieces)} {rng.randint(0, 10**6)} and {rng.choice(pieces)}?"
        steps = [f"{a} + {b} = {a + b}" for a, b in ((rng.randint(1, 999), rng.randint(1, 999))
                                                    for _ in range(rng.randint(1, 4)))]
        answer = "\n".join(steps + [rng.choice(pieces), f"#### {rng.randint(-50, 10**4)}"])
        records.append({"question": question, "answer": answer, "id": i})
    return records


def gsm8k_document(record):
    return f"Question: {record['question']}\nAnswer: {record['answer']}"


def write_random_folder(folder, n_docs, doc_len, seed, source="random"):
    """A folder of random byte documents; returns its train tokens."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(folder, BYTE, {"test": source}) as writer:
        for _ in range(n_docs):
            writer.add("train", rng.integers(0, 256, doc_len).tolist())
        writer.add("val", rng.integers(0, 256, doc_len).tolist())
    return tokens_of(folder, "train")


# ---------------------------------------------------------------------------
# Preparation: what a JSONL file becomes
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A small trained byte-level BPE (Qwen's split, NFC), so ids above 255 occur."""
    folder = tmp_path_factory.mktemp("bpe")
    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    hf.train_from_iterator([gsm8k_document(r) for r in gsm8k_records(60)] * 2, trainer=trainer)
    hf.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_gsm8k_round_trip_and_meta(which, bpe_folder, tmp_path):
    records = gsm8k_records(60)
    documents = [gsm8k_document(r) for r in records]
    assert all(unicodedata.is_normalized("NFC", d) for d in documents)  # so NFC cannot change them
    source = write_jsonl(tmp_path / "gsm8k.jsonl", records)
    tokenizer_arg = "byte" if which == "byte" else bpe_folder
    tokenizer = load_tokenizer(str(tokenizer_arg))
    out = run_prepare(source, tmp_path / "out", "--format", "gsm8k", "--seed", "3",
                      tokenizer=tokenizer_arg, val_share="0.25")
    assert files_in(out) == ["meta.json", "train.bin", "val.bin"]

    train, val = decoded(out, "train", tokenizer), decoded(out, "val", tokenizer)
    assert sorted(train + val) == sorted(documents)  # every document once, exactly as formatted
    assert train == [d for d in documents if d in set(train)]  # in input order
    assert val == [d for d in documents if d in set(val)]
    assert 5 <= len(val) <= 25  # 15 expected

    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
                                 "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size}
    assert meta["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert meta["source"]["format"] == "gsm8k" and meta["source"]["seed"] == 3
    for split, docs in (("train", train), ("val", val)):
        tokens, counts = tokens_of(out, split), meta["splits"][split]
        # uint32
        assert (out / f"{split}.bin").stat().st_size == 4 * counts["tokens"] == 4 * len(tokens)
        assert counts["documents"] == len(docs) == int((tokens == tokenizer.eos_id).sum())
        assert counts["max_token_id"] == int(tokens.max()) < tokenizer.vocab_size
        assert counts["sha256"] == hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()
    all_tokens = np.concatenate([tokens_of(out, "train"), tokens_of(out, "val")])
    if which == "bpe":
        assert all_tokens.max() > 255  # ids that no byte-wide format could hold
        # Merges really apply.
        assert len(all_tokens) < 0.8 * sum(len(d.encode()) for d in documents)
    load_meta(out, tokenizer, tokenizer.vocab_size)  # and the format's own checks accept it


def test_val_split_is_decided_by_seed(tmp_path):
    source = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_records(40))
    a, b, c = (run_prepare(source, tmp_path / name, "--format", "gsm8k", "--seed", seed,
                           val_share="0.3")
               for name, seed in (("a", "5"), ("b", "5"), ("c", "6")))
    for split in ("train", "val"):
        assert (a / f"{split}.bin").read_bytes() == (b / f"{split}.bin").read_bytes()
    assert decoded(a, "val", BYTE) != decoded(c, "val", BYTE)


FORMATS = {
    "numina": ([{"problem": "Find x if 2x = 6.", "solution": "x = 3"},
                {"messages": [{"role": "user", "content": "Solve x² = 4."},
                              {"role": "assistant", "content": "x = ±2"}]}],
               ["Problem: Find x if 2x = 6.\nSolution: x = 3",
                "User: Solve x² = 4.\n\nAssistant: x = ±2"]),
    "code": ([{"question": "Add?", "response": "def add(a, b):\n    return a + b"},
              {"problem": "Max of a list", "solution": "max(xs)"},
              {"prompt": "Print hi", "code": "print('hi')"},
              {"prompt": "Sum 1..n", "answer": "n * (n + 1) // 2"}],
             ["Question: Add?\nAnswer: def add(a, b):\n    return a + b",
              "Question: Max of a list\nAnswer: max(xs)",
              "Question: Print hi\nAnswer: print('hi')",
              "Question: Sum 1..n\nAnswer: n * (n + 1) // 2"]),
    "instruct": ([{"conversations": [{"from": "system", "value": "Be brief."},
                                     {"from": "human", "value": "Hi ☺"},
                                     {"from": "gpt", "value": "Hello."}]},
                  {"messages": [{"role": "user", "content": "2 + 2?"},
                                {"role": "assistant", "content": "4"},
                                {"role": "user", "content": "And 3 + 3?"}]}],
                 ["System: Be brief.\n\nUser: Hi ☺\n\nAssistant: Hello.",
                  "User: 2 + 2?\n\nAssistant: 4\n\nUser: And 3 + 3?"]),
    "text": ([{"text": "Plain text,\nwith ünïcode and 12345."},
              {"text": "second", "meta": {"x": 1}}],
             ["Plain text,\nwith ünïcode and 12345.", "second"]),
}


@pytest.mark.parametrize("fmt", [*FORMATS, "template"])
def test_each_format_renders_as_documented(fmt, tmp_path):
    if fmt == "template":
        records = [{"title": "Über", "body": "Line one\nline two", "n": 7},
                   {"title": "T2", "body": "", "n": 0}]
        expected = ["Über (7)\nLine one\nline two", "T2 (0)\n"]
        args = ["--template", "{title} ({n})\n{body}"]
    else:
        (records, expected), args = FORMATS[fmt], ["--format", fmt]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = run_prepare(source, tmp_path / "out", *args)
    assert decoded(out, "train", BYTE) == expected
    assert (out / "val.bin").stat().st_size == 0
    # An empty split has no windows.
    assert read_windows(out, "val", SEQ_LEN).shape == (0, SEQ_LEN + 1)


# ---------------------------------------------------------------------------
# Preparation: bad input
# ---------------------------------------------------------------------------

GOOD = {"question": "q", "answer": "a"}


def lines_file(tmp_path, *lines, name="bad.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n"
                              for line in lines))
    return path


BAD_INPUTS = {  # lines of the file, extra arguments, what the message must say
    "invalid JSON": ([json.dumps(GOOD), "", json.dumps(GOOD), '{"question": "q", "answer": }'], [],
                     ["line 4", "not valid JSON"]),
    "missing field": ([json.dumps(GOOD)] * 2 + [json.dumps({"question": "q", "solution": "s"})], [],
                      ["line 3", "'answer'", "gsm8k"]),
    "not an object": ([json.dumps(GOOD), "[1, 2]"], [], ["line 2", "list"]),
    "template field": ([json.dumps({"title": "t", "body": "b"}), json.dumps({"title": "t"})],
                       ["--template", "{title}: {body}"], ["line 2", "'body'", "--template"]),
    "bad UTF-8": ([json.dumps(GOOD), b'{"question": "caf\xe9", "answer": "a"}'], [],
                  ["line 2", "UTF-8"]),
    "only blank lines": (["", "  ", ""], [], ["blank lines"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_named_and_leaves_nothing(case, tmp_path):
    lines, args, phrases = BAD_INPUTS[case]
    source = lines_file(tmp_path, *lines)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        run_prepare(source, out, *(args or ["--format", "gsm8k"]))
    for phrase in [str(source), *phrases]:
        assert phrase in str(error.value), f"{phrase!r} not in {str(error.value)!r}"
    assert files_in(out) == []  # no token file, temporary or not, and no meta.json


def test_missing_and_empty_input(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        run_prepare(missing, tmp_path / "out", "--format", "gsm8k")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(empty)) + " is empty"):
        run_prepare(empty, tmp_path / "out", "--format", "gsm8k")
    assert not (tmp_path / "out").exists()


def test_failed_prepare_keeps_an_earlier_dataset_whole(tmp_path):
    out = tmp_path / "out"
    first = run_prepare(write_jsonl(tmp_path / "a.jsonl", gsm8k_records(12)), out,
                        "--format", "gsm8k", val_share="0.3")
    before = {name: (out / name).read_bytes() for name in files_in(out)}
    bad = lines_file(tmp_path, *[json.dumps(GOOD)] * 30, "{broken")
    with pytest.raises(ValueError, match="line 31"):
        run_prepare(bad, out, "--format", "gsm8k")
    # The folder is exactly the earlier complete dataset: never its meta.json with new tokens.
    assert {name: (out / name).read_bytes() for name in files_in(first)} == before
    meta = load_meta(out, BYTE, BYTE.vocab_size)
    for split in ("train", "val"):
        assert meta["splits"][split]["sha256"] == \
            hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()

    # A successful prepare replaces all of it, meta.json and tokens together.
    replacement = write_jsonl(tmp_path / "b.jsonl", [GOOD])
    run_prepare(replacement, out, "--format", "gsm8k")
    meta = load_meta(out)
    assert meta["source"]["sha256"] == hashlib.sha256(replacement.read_bytes()).hexdigest()
    assert decoded(out, "train", BYTE) == ["Question: q\nAnswer: a"]
    assert files_in(out) == sorted(before)


# ---------------------------------------------------------------------------
# load_meta: data that does not fit the model
# ---------------------------------------------------------------------------


def test_load_meta_refuses_data_the_model_cannot_read(bpe_folder, tmp_path):
    folder = tmp_path / "data"
    with DatasetWriter(folder, BYTE, {"test": "meta"}) as writer:
        writer.add("train", [1, 2, 255])
        writer.add("val", [3])
    assert load_meta(folder, BYTE, vocab_size=257)["splits"]["train"]["max_token_id"] == 256
    with pytest.raises(ValueError, match=r"token id 256, but the model's vocabulary has 256 rows"):
        load_meta(folder, vocab_size=256)
    with pytest.raises(ValueError, match=r"tokenized with 'byte', whose vocabulary differs"):
        load_meta(folder, load_tokenizer(str(bpe_folder)))
    (folder / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "meta.json"))):
        load_meta(folder)


MISSING = object()
# A meta.json that parses but was edited by hand or written by another program: (key, its new
# value or MISSING, what the error says after the path).
WRONG_SHAPES = [
    ("tokenizer", MISSING, " has no 'tokenizer' (expected an object)"),
    ("tokenizer", "byte", ": tokenizer is 'byte', expected an object"),
    ("tokenizer.fingerprint", 7, ": tokenizer.fingerprint is 7, expected a string"),
    ("splits.val", MISSING, " has no 'splits.val' (expected an object)"),
    ("splits", [], ": splits is [], expected an object"),
    ("splits.train.tokens", MISSING,
     " has no 'splits.train.tokens' (expected a whole number >= 0)"),
    ("splits.train.tokens", "5", ": splits.train.tokens is '5', expected a whole number >= 0"),
    ("splits.train.tokens", True, ": splits.train.tokens is True, expected a whole number >= 0"),
    ("splits.val.max_token_id", MISSING,
     " has no 'splits.val.max_token_id' (expected a whole number >= -1)"),
    ("splits.train.sha256", MISSING, " has no 'splits.train.sha256' (expected 64 lowercase hex"),
    ("splits.train.sha256", None, ": splits.train.sha256 is None, expected 64 lowercase hex"),
]


@pytest.mark.parametrize("key, value, message", WRONG_SHAPES,
                         ids=[f"{k}={'missing' if v is MISSING else repr(v)}"
                              for k, v, _ in WRONG_SHAPES])
def test_meta_json_of_the_wrong_shape_is_named_by_key_by_every_reader(tmp_path, key, value,
                                                                     message):
    folder = tmp_path / "data"
    write_random_folder(folder, 3, 20, seed=0)
    meta = json.loads((folder / "meta.json").read_text())
    *parents, last = key.split(".")
    inner = meta
    for parent in parents:
        inner = inner[parent]
    if value is MISSING:
        del inner[last]
    else:
        inner[last] = value
    (folder / "meta.json").write_text(json.dumps(meta))
    readers = {"load_meta": lambda: load_meta(folder, BYTE, BYTE.vocab_size),
               "verify_checksums": lambda: verify_checksums(folder),
               "MixtureLoader": lambda: MixtureLoader(folder, folder, SEQ_LEN, 2, 2, 0.5, 0)}
    for name, read in readers.items():
        with pytest.raises(ValueError) as error:
            read()
        assert str(error.value).startswith(f"{folder / 'meta.json'}{message}"), (name, error.value)
        assert str(error.value).endswith("prepare the data again (python data/prepare.py or "
                                         "python data/embedded.py)"), name


# ---------------------------------------------------------------------------
# MixtureLoader
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Random target (23 windows) and general (40 windows) folders, and every window of each."""
    root = tmp_path_factory.mktemp("mixture")
    target_tokens = write_random_folder(root / "target", 5, 36, seed=0)    # 5 * 37 = 185 tokens
    general_tokens = write_random_folder(root / "general", 8, 40, seed=1)  # 8 * 41 = 328 tokens
    target_windows = read_windows(root / "target", "train", SEQ_LEN)
    general_windows = read_windows(root / "general", "train", SEQ_LEN)
    assert (len(target_tokens), len(target_windows), len(general_windows)) == \
        (185, N_TARGET, N_GENERAL)
    # Window i starts at token i * seq_len: written out independently here.
    for i in range(N_TARGET):
        assert target_windows[i].tolist() == \
            target_tokens[i * SEQ_LEN:i * SEQ_LEN + SEQ_LEN + 1].tolist()
    general_lookup = {tuple(w): i for i, w in enumerate(general_windows.tolist())}
    # Random windows are distinct, so a row names its window.
    assert len(general_lookup) == N_GENERAL
    return {"target": root / "target", "general": root / "general",
            "general_lookup": general_lookup, "general_tokens": general_tokens}


def make_loader(folders, global_batch_size=10, micro_batch_size=None, target_ratio=0.6, seed=1,
                **kw):
    return MixtureLoader(folders["target"], folders["general"], SEQ_LEN, global_batch_size,
                         micro_batch_size or global_batch_size, target_ratio, seed, **kw)


def rows_of(batches, folders):
    """(is_target, window index) for each row of a step's micro-batches, in order; general rows
    are identified by their content."""
    rows = []
    for b in batches:
        windows = torch.cat([b.inputs, b.targets[:, -1:]], dim=1)
        for window, is_target, index in zip(windows.tolist(), b.target_rows.tolist(),
                                            b.sample_index.tolist()):
            rows.append((True, index) if is_target
                        else (False, folders["general_lookup"][tuple(window)]))
    return rows


def run_steps(loader, steps, folders):
    return [rows_of(loader.next_batch(), folders) for _ in range(steps)]


def target_stream(steps_rows):
    return [i for rows in steps_rows for t, i in rows if t]


def general_stream(steps_rows):
    return [i for rows in steps_rows for t, i in rows if not t]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(getattr(x, f), getattr(y, f))
                                    for x, y in zip(a, b) for f in FIELDS)


def crosses_a_pass(start, stop, n):
    """Whether stream positions start .. stop - 1 of a source with n windows span two passes."""
    return stop > start and start // n != (stop - 1) // n


def test_every_target_window_once_per_epoch(folders):
    loader = make_loader(folders)  # 6 target rows a step
    assert loader.n_target == N_TARGET
    assert loader.steps_for_epochs(1) == 4 and loader.steps_for_epochs(3) == 12
    seen = target_stream(run_steps(loader, loader.steps_for_epochs(3), folders))
    assert len(seen) == 72
    epochs = [seen[k * N_TARGET:(k + 1) * N_TARGET] for k in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(N_TARGET))
    assert Counter(seen[:3 * N_TARGET]) == {i: 3 for i in range(N_TARGET)}
    assert len({tuple(epoch) for epoch in epochs}) == 3  # a fresh order each epoch
    # The order is the seed's: another seed, another order; the same seed, the same.
    assert target_stream(run_steps(make_loader(folders), 4, folders)) == seen[:24]
    assert target_stream(run_steps(make_loader(folders, seed=2), 4, folders)) != seen[:24]


def test_epoch_counts_exactly(folders):
    loader = make_loader(folders)
    for _ in range(loader.steps_for_epochs(1) - 1):
        loader.next_batch()
    assert loader.epoch < 1
    loader.next_batch()
    assert 1 <= loader.epoch < 1 + 6 / N_TARGET and loader.epoch == 24 / N_TARGET
    # 23 steps of 6 rows: exactly 6 passes.
    for _ in range(loader.steps_for_epochs(6) - loader.step):
        loader.next_batch()
    assert loader.step == 23 and loader.epoch == 6.0


@pytest.mark.parametrize("global_batch_size, target_ratio",
                         [(10, 0.59), (7, 0.6), (16, 0.37), (12, 1.0)])
def test_steps_for_epochs_is_the_first_step_count_that_suffices(folders, global_batch_size,
                                                                 target_ratio):
    # Counted from the loader's own bookkeeping: the rows it really took, step by step.
    for epochs in (0.5, 1, 2.25, 3):
        loader = make_loader(folders, global_batch_size, target_ratio=target_ratio)
        epochs_after = [0.0]
        while epochs_after[-1] < epochs + 1:
            loader.next_batch()
            epochs_after.append(loader.epoch)
        first = next(step for step, epoch in enumerate(epochs_after) if epoch >= epochs)
        assert loader.steps_for_epochs(epochs) == first, epochs


@pytest.mark.parametrize("global_batch_size, target_ratio",
                         [(10, 0.6), (16, 0.6), (7, 0.6), (7, 0.35)])
def test_target_share_is_exact_and_never_drifts(folders, global_batch_size, target_ratio):
    loader = make_loader(folders, global_batch_size, target_ratio=target_ratio)
    per_step = Fraction(str(target_ratio)) * global_batch_size
    target_rows = target_tokens = all_tokens = 0
    for step in range(1, 151):
        for batch in loader.next_batch():
            target_rows += int(batch.target_rows.sum())
            target_tokens += batch.inputs[batch.target_rows].numel()
            all_tokens += batch.inputs.numel()
        assert target_rows == math.floor(step * per_step), step
        assert loader.epoch == target_rows / N_TARGET  # epochs count the windows really taken
    assert all_tokens == 150 * global_batch_size * SEQ_LEN
    assert abs(target_tokens / all_tokens - target_ratio) < 0.01


def test_rows_are_the_windows_of_the_files(folders):
    loader = make_loader(folders, micro_batch_size=5)
    tokens = tokens_of(folders["target"], "train").astype(np.int64)
    general = folders["general_tokens"].astype(np.int64)
    for _ in range(6):
        batches = loader.next_batch()
        assert len(batches) == 2
        for b in batches:
            assert b.inputs.shape == b.targets.shape == (5, SEQ_LEN)
            assert b.inputs.dtype == torch.int64
            assert b.target_rows.dtype == torch.bool
            assert torch.equal(b.sample_index == -1, ~b.target_rows)
            assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])  # targets: inputs shifted by one
            for row in range(5):
                i = int(b.sample_index[row])
                if b.target_rows[row]:
                    start = i * SEQ_LEN
                    assert b.inputs[row].tolist() == tokens[start:start + SEQ_LEN].tolist()
                    assert b.targets[row].tolist() == tokens[start + 1:start + SEQ_LEN + 1].tolist()
                else:
                    g = folders["general_lookup"][tuple(b.inputs[row].tolist()
                                                        + b.targets[row, -1:].tolist())]
                    assert b.inputs[row].tolist() == \
                        general[g * SEQ_LEN:g * SEQ_LEN + SEQ_LEN].tolist()


def test_general_data_is_read_once_through_before_repeating(folders, capsys):
    loader = make_loader(folders)  # 4 general rows a step: 10 steps read the 40 windows
    first_pass = general_stream(run_steps(loader, 10, folders))
    assert sorted(first_pass) == list(range(N_GENERAL))
    assert "exhausted" not in capsys.readouterr().err
    second_pass = general_stream(run_steps(loader, 10, folders))
    err = capsys.readouterr().err
    assert err.count("note: general data") == 1
    assert str(folders["general"]) in err and "1 pass" in err
    assert sorted(second_pass) == list(range(N_GENERAL)) and second_pass != first_pass
    # Other ranks stay quiet: the note is printed once, not once per process.
    quiet = make_loader(folders, micro_batch_size=5, rank=1, world_size=2)
    run_steps(quiet, 11, folders)
    assert capsys.readouterr().err == ""


def test_ranks_and_micro_batches_split_one_global_batch(folders):
    single = make_loader(folders, 12)  # 7.2 target rows a step
    small = make_loader(folders, 12, micro_batch_size=2)
    ranks = [make_loader(folders, 12, micro_batch_size=3, rank=r, world_size=2) for r in (0, 1)]
    strict_steps = 0
    for step in range(12):
        # Target rows so far.
        t0, t1 = math.floor(step * Fraction(36, 5)), math.floor((step + 1) * Fraction(36, 5))
        whole = single.next_batch()
        rows = rows_of(whole, folders)
        pieces = small.next_batch()
        assert len(pieces) == 6 and rows_of(pieces, folders) == rows
        for piece in pieces:  # target rows are spread through the batch: each piece gets its share
            assert abs(int(piece.target_rows.sum()) - 2 * (t1 - t0) / 12) < 1, step
        assert all(torch.equal(torch.cat([getattr(b, f) for b in pieces]), getattr(whole[0], f))
                   for f in FIELDS)
        mine = [r.next_batch() for r in ranks]
        assert [len(m) for m in mine] == [2, 2]
        rank_rows = [rows_of(m, folders) for m in mine]
        assert Counter(rank_rows[0]) + Counter(rank_rows[1]) == Counter(rows)
        assert rank_rows[0] + rank_rows[1] == rows  # rank r takes the r-th half of the global batch
        halves = [Batch(*(getattr(whole[0], f)[k:k + 3] for f in FIELDS)) for k in range(0, 12, 3)]
        assert same_batches([b for m in mine for b in m], halves)
        # 23 target windows are fewer than three steps' worth (3 x 8): too few to keep a step that
        # starts a new pass from holding a window twice, once from each pass. Elsewhere, never.
        boundary = (crosses_a_pass(t0, t1, N_TARGET)
                    or crosses_a_pass(12 * step - t0, 12 * (step + 1) - t1, N_GENERAL))
        shared = set(rank_rows[0]) & set(rank_rows[1])
        if boundary:
            assert all(Counter(rows)[r] == 2 for r in shared), step
        else:
            strict_steps += 1
            assert not shared and len(set(rows)) == len(rows), step
    assert strict_steps >= 6


def test_a_step_across_two_passes_never_takes_a_window_twice(folders):
    """With each source at least three steps' worth of windows (23 >= 3 x 6 target, 40 >= 3 x 4
    general rows), no step holds a window twice, so two ranks never share one; and each pass
    still takes every window exactly once."""
    ranks = [make_loader(folders, 10, micro_batch_size=5, rank=r, world_size=2) for r in (0, 1)]
    crossings, seen = 0, []
    for step in range(40):  # about 10 target passes and 4 general ones
        halves = [rows_of(r.next_batch(), folders) for r in ranks]
        rows = halves[0] + halves[1]
        assert not set(halves[0]) & set(halves[1]) and len(set(rows)) == len(rows), step
        crossings += crosses_a_pass(6 * step, 6 * (step + 1), N_TARGET)
        seen += [index for is_target, index in rows if is_target]
    assert crossings >= 5
    for epoch in range(len(seen) // N_TARGET):
        assert sorted(seen[epoch * N_TARGET:(epoch + 1) * N_TARGET]) == list(range(N_TARGET))


def test_resume_from_state_dict_gives_the_same_batches(folders):
    original = make_loader(folders, micro_batch_size=5)
    for _ in range(7):
        original.next_batch()
    # Plain numbers, as a checkpoint stores them.
    state = json.loads(json.dumps(original.state_dict()))
    fresh = make_loader(folders, micro_batch_size=5)
    used = make_loader(folders, micro_batch_size=5)
    for _ in range(15):  # a loader that has read further already, with later orders in hand
        used.next_batch()
    for resumed in (fresh, used):
        resumed.load_state_dict(state)
    assert fresh.epoch == used.epoch == original.epoch
    for _ in range(10):  # across a target epoch and the general set's first wrap
        expected = original.next_batch()
        assert same_batches(fresh.next_batch(), expected)
        assert same_batches(used.next_batch(), expected)


def test_loader_configuration_errors(folders, tmp_path):
    tiny = tmp_path / "tiny"
    write_random_folder(tiny, 1, 5, seed=3)  # 6 tokens: less than one window of 9
    with pytest.raises(ValueError, match=re.escape(f"{tiny}/train.bin") + r".*seq_len \+ 1 = 9"):
        MixtureLoader(tiny, folders["general"], SEQ_LEN, 10, 10, 0.6, 0)
    with pytest.raises(ValueError, match=re.escape(f"{tiny}/train.bin") + r".*9 tokens"):
        MixtureLoader(folders["target"], tiny, SEQ_LEN, 10, 10, 0.6, 0)
    with pytest.raises(ValueError, match=r"global_batch_size=10 .*micro_batch_size=3 x 2 ranks"):
        make_loader(folders, 10, micro_batch_size=3, world_size=2)
    with pytest.raises(ValueError, match=r"target_ratio=1.5"):
        make_loader(folders, target_ratio=1.5)
    assert make_loader(folders, 12, micro_batch_size=3, world_size=2).n_target == N_TARGET
    # At target_ratio 1 the general folder is not read at all.
    only_target = MixtureLoader(folders["target"], tmp_path / "absent", SEQ_LEN, 4, 4, 1.0, 0)
    assert all(only_target.next_batch()[0].target_rows)


def test_loader_refuses_token_ids_beyond_the_vocabulary_naming_the_file(folders, tmp_path):
    """The training read path checks each window it reads, not only meta.json's max_token_id: the
    files may have changed since (an id past the embedding is an IndexError on a CPU and a
    device-side assert on a GPU)."""
    # Random bytes: ids up to 255 in most windows, and 256 (end-of-text).
    only_target = make_loader(folders, target_ratio=1.0, vocab_size=200)
    with pytest.raises(ValueError, match=re.escape(f"{folders['target']}/train.bin") +
                       r" holds token id 2\d\d in window \d+, but the model's vocabulary has 200 "
                       "rows; prepare the data again with the model's tokenizer"):
        only_target.next_batch()
    general = tmp_path / "general"
    with DatasetWriter(general, BYTE, {"test": "beyond"}) as writer:
        writer.add("train", [7] * 30 + [300] + [7] * 30)  # 62 tokens: 7 windows, id 300 in window 3
        writer.add("val", [7])
    mixed = MixtureLoader(folders["target"], general, SEQ_LEN, 10, 5, 0.6, 1, vocab_size=257)
    with pytest.raises(ValueError, match=re.escape(f"{general}/train.bin") +
                       " holds token id 300 in window 3, but the model's vocabulary has 257 rows"):
        for _ in range(2):  # 4 general rows a step: every window within two steps
            mixed.next_batch()


# ---------------------------------------------------------------------------
# The CPU demo's embedded data
# ---------------------------------------------------------------------------

DEMO = {"seed": 0, "n_train": 10, "n_val": 5, "n_test": 5, "n_pool": 40}
DEMO_FILES = ["general/meta.json", "general/train.bin", "general/val.bin", "general_base/meta.json",
              "general_base/train.bin", "general_base/val.bin", "math/meta.json", "math/test.jsonl",
              "math/train.bin", "math/val.bin", "math_pool/meta.json", "math_pool/train.bin",
              "math_pool/val.bin"]


def demo_snapshot(out):
    return {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns)
            for name in DEMO_FILES}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo data, written once; what the tests read is taken now, before any test rewrites
    it."""
    out = tmp_path_factory.mktemp("demo")
    write_demo_data(str(out), **DEMO)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    documents = {(folder, split): decoded(out / folder, split, BYTE)
                 for folder in ("math", "math_pool") for split in ("train", "val")}
    metas = {folder: load_meta(out / folder, BYTE, BYTE.vocab_size)
             for folder in ("math", "math_pool", "general_base", "general")}
    test_records = [json.loads(line)
                    for line in (out / "math" / "test.jsonl").read_text().splitlines()]
    return {"out": out, "files": files, "documents": documents, "metas": metas,
            "test": test_records, "stamps": demo_snapshot(out)}


def test_demo_data_holds_the_splits(demo):
    assert demo["files"] == DEMO_FILES
    splits = make_splits(**DEMO)
    assert demo["documents"]["math", "train"] == [format_problem(p) for p in splits["train"]]
    assert demo["documents"]["math", "val"] == [format_problem(p) for p in splits["val"]]
    assert demo["documents"]["math_pool", "train"] == \
        [format_problem(p) for p in splits["pool"][2:]]
    assert demo["documents"]["math_pool", "val"] == [format_problem(p) for p in splits["pool"][:2]]
    assert demo["test"] == [{"question": p.question, "answer": p.answer} for p in splits["test"]]
    for folder in ("general_base", "general"):
        counts = demo["metas"][folder]["splits"]
        assert counts["train"]["documents"] > 100 and counts["val"]["documents"] >= 1
    assert demo["metas"]["general"]["splits"]["train"]["sha256"] != \
        demo["metas"]["general_base"]["splits"]["train"]["sha256"]
    assert {m["source"]["seed"] for m in demo["metas"].values()} == {0}


def test_demo_data_is_reused_for_the_same_settings_and_rewritten_otherwise(demo, capsys):
    out = demo["out"]
    capsys.readouterr()
    write_demo_data(str(out), **DEMO)
    assert "already exists; reusing it" in capsys.readouterr().out
    assert demo_snapshot(out) == demo["stamps"]  # no file replaced, none touched

    write_demo_data(str(out), **{**DEMO, "seed": 1})
    assert "reusing" not in capsys.readouterr().out
    stamps = demo_snapshot(out)
    assert all(stamps[name] != demo["stamps"][name] for name in DEMO_FILES)
    assert load_meta(out / "math")["source"]["seed"] == 1
    train = [format_problem(p) for p in make_splits(**{**DEMO, "seed": 1})["train"]]
    assert decoded(out / "math", "train", BYTE) == train != demo["documents"]["math", "train"]


def test_demo_data_with_a_damaged_meta_json_is_written_again(tmp_path, capsys):
    write_demo_data(str(tmp_path), **DEMO)
    meta = json.loads((tmp_path / "general" / "meta.json").read_text())
    del meta["source"]
    (tmp_path / "general" / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    write_demo_data(str(tmp_path), **DEMO)
    assert "reusing" not in capsys.readouterr().out
    assert load_meta(tmp_path / "general")["source"]["seed"] == DEMO["seed"]
