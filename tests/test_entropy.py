"""entropy.py: per-token entropy and NLL against a brute-force softmax over transformers' logits,
the chunked output head, the cache file (its contents, float16 dtype and alignment with the
loader's windows), its refusal of a cache built from another model, other data or another
window length, the checkpoint fingerprint, the file on disk (permissions, concurrent and failed
writes), and the command line's one-line refusals of bad settings and of data that does not fit
the model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen3Config, Qwen3ForCausalLM

import entropy
from data.loader import DatasetWriter, read_windows
from entropy import (build_entropy_cache, cache_header, checkpoint_fingerprint, default_cache_path,
                     load_entropy_cache, token_entropies)
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer

SEQ_LEN = 16


def softmax_scores(logits, targets):
    """Brute force: (..., vocab) logits of one prediction and (...) the token that came next ->
    the prediction's entropy and the token's NLL, in float64."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1), -log_p.gather(-1, targets[..., None]).squeeze(-1)


def assert_matches(ours, reference, atol):
    """ours (B, T) from token_entropies against reference (B, T - 1) for columns 1 .. T - 1."""
    assert ours.dtype == torch.float32
    assert ours.shape == (reference.shape[0], reference.shape[1] + 1)
    assert ours[:, 0].isnan().all() and not ours[:, 1:].isnan().any()
    assert (ours[:, 1:].double() - reference).abs().max() <= atol


def sharpen(norm, scale):
    """Scale the final norm's weight: larger logits, sharper and more varied predictions (the tied
    head favours the input token), so that entropies spread and a misaligned column shows."""
    with torch.no_grad():
        norm.weight.mul_(scale)


def test_entropy_and_nll_match_transformers(tmp_path):
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=256, tie_word_embeddings=True)
    reference = Qwen3ForCausalLM(config).eval()
    sharpen(reference.model.norm, 5.0)
    reference.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 300, (3, 33))
    with torch.no_grad():
        # Column t of ours is the prediction made at position t - 1 of the token at t.
        entropy, nll = softmax_scores(reference(idx).logits[:, :-1], idx[:, 1:])
    assert entropy.std() > 0.3  # informative: far from uniform predictions
    ours_entropy, ours_nll = token_entropies(ours, idx, return_nll=True)
    assert_matches(ours_entropy, entropy, 1e-4)
    assert_matches(ours_nll, nll, 1e-4)
    torch.testing.assert_close(token_entropies(ours, idx), ours_entropy, rtol=0, atol=0,
                               equal_nan=True)


def test_chunked_head_equals_unchunked():
    # Two (rows, vocab) buffers, so at most 2**27 // 2**20 = 128 predictions per chunk: the 2 x 139
    # here take three chunks of 93, 93 and 92; the middle one straddles the two sequences.
    vocab = 2**19
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=8,
                                    max_position_embeddings=512)).eval()
    sharpen(model.norm, 40.0)
    chunk = model.head_chunk_rows(278, buffers=2)
    assert chunk == 93
    idx = torch.randint(0, vocab, (2, 140))
    entropy, nll = token_entropies(model, idx, return_nll=True)
    # The reference, one prediction at a time through the same head, at every chunk's first and
    # last predictions and a spread of others (all of them would cost seconds at this vocabulary).
    rows = sorted({*range(0, 278, 23),
                   *(c + o for c in (0, chunk, 2 * chunk) for o in (-2, -1, 0, 1)), 276, 277})
    rows = torch.tensor([r for r in rows if 0 <= r < 278])         # flat indices into (b, t - 1)
    b, t = rows // 139, rows % 139 + 1                            # column t is predicted at t - 1
    with torch.no_grad():
        hidden = model.body(idx[:, :-1]).double()                  # (2, 139, d)
        logits = hidden[b, t - 1] @ model.lm_head.weight.double().T  # (len(rows), vocab)
    reference_entropy, reference_nll = softmax_scores(logits, idx[b, t])
    assert (entropy[b, t].double() - reference_entropy).abs().max() <= 1e-4
    assert (nll[b, t].double() - reference_nll).abs().max() <= 1e-4
    assert reference_entropy.std() > 0.3
    assert entropy[:, 0].isnan().all() and not entropy[:, 1:].isnan().any()
    assert not nll[:, 1:].isnan().any()


def test_bfloat16_autocast_entropies_stay_close_to_float32():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64)).eval()
    sharpen(model.norm, 10.0)
    idx = torch.randint(0, 300, (2, 40))
    full = token_entropies(model, idx, return_nll=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = token_entropies(model, idx, return_nll=True)
    for a, b in zip(full, half):
        assert b.dtype == torch.float32
        assert (a - b)[:, 1:].abs().max() <= 0.02 * a[:, 1:].abs().max()  # bf16 keeps 2-3 digits
        assert a[:, 1:].std() > 0.1


# ---- the cache ----------------------------------------------------------------------------------

def save_checkpoint(folder, seed, vocab_size=257):
    """A tiny model with the byte tokenizer, as entropy.py's command line reads a checkpoint."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=64))
    sharpen(model.norm, 10.0)
    model.save_pretrained(folder)
    load_tokenizer("byte").save(folder)


def prepare_target(folder, seed):
    """A byte-tokenized target folder: 340 train tokens (21 windows of 16) and 100 val (6)."""
    tokenizer = load_tokenizer("byte")
    g = torch.Generator().manual_seed(seed)
    text = lambda n: "".join(chr(ord("a") + c)
                             for c in torch.randint(0, 26, (n,), generator=g).tolist())
    with DatasetWriter(folder, tokenizer, source={"kind": "test"}) as writer:
        for _ in range(10):
            writer.add("train", tokenizer.encode(text(33)))
        for _ in range(4):
            writer.add("val", tokenizer.encode(text(24)))


def built_cache(tmp_path):
    """(checkpoint folder, target folder, cache path, header, model) with the cache written."""
    checkpoint, target = tmp_path / "base", tmp_path / "target"
    save_checkpoint(checkpoint, 0)
    prepare_target(target, 0)
    header = cache_header(checkpoint, target, SEQ_LEN)
    path = default_cache_path(target, header["model"], SEQ_LEN)
    model = Transformer.from_pretrained(checkpoint).eval()
    build_entropy_cache(model, target, SEQ_LEN, path, header, batch_size=4)  # ragged last batch
    return checkpoint, target, path, header, model


def test_cache_holds_the_entropies_of_each_window(tmp_path):
    _, target, path, header, model = built_cache(tmp_path)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == header
        stored = {key: f.get_tensor(key) for key in f.keys()}
    assert sorted(stored) == ["train_entropy", "train_nll", "val_entropy", "val_nll"]
    for split, n_windows in (("train", 21), ("val", 6)):
        windows = torch.from_numpy(read_windows(target, split, SEQ_LEN))
        assert windows.shape == (n_windows, SEQ_LEN + 1)
        entropy, nll = token_entropies(model, windows, return_nll=True)
        for name, expected in (("entropy", entropy), ("nll", nll)):
            cached = stored[f"{split}_{name}"]
            assert cached.dtype == torch.float16 and cached.shape == (n_windows, SEQ_LEN + 1)
            assert cached[:, 0].isnan().all()
            torch.testing.assert_close(cached.float(), expected, rtol=1e-3, atol=1e-3,
                                       equal_nan=True)
        assert entropy[:, 1:].std() > 0.3
    loaded = load_entropy_cache(path, header, "rebuild it")
    assert all(t.dtype == torch.float32 for t in loaded.values())
    for key, tensor in stored.items():
        torch.testing.assert_close(loaded[key], tensor.float(), rtol=0, atol=0, equal_nan=True)


def test_two_ranks_build_the_same_cache_as_one_process(tmp_path):
    """entropy.py under torchrun: ranks take every other window (21 train windows: 11 and 10, so
    the gather pads one rank) and rank 0 writes windows back in their original order."""
    checkpoint, target, path, header, _ = built_cache(tmp_path)
    two_rank_path = tmp_path / "two_ranks.safetensors"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", str(Path(__file__).parents[1] / "entropy.py"),
                    "--init_from", str(checkpoint), "--target_data", str(target),
                    "--seq_len", str(SEQ_LEN), "--entropy_cache", str(two_rank_path),
                    "--batch_size", "3"], check=True, capture_output=True, timeout=600)
    one, two = (load_entropy_cache(path, header, "rebuild it"),
                load_entropy_cache(two_rank_path, header, "rebuild it"))
    assert sorted(one) == sorted(two)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-3, equal_nan=True)


@pytest.mark.parametrize("change", ["model", "data", "seq_len"])
def test_cache_from_another_model_data_or_window_length_is_refused(tmp_path, change):
    checkpoint, target, path, header, _ = built_cache(tmp_path)
    seq_len = SEQ_LEN
    if change == "model":
        save_checkpoint(checkpoint, 1)  # re-saved with other weights, same config
    elif change == "data":
        prepare_target(target, 1)       # re-prepared with other documents, same sizes
    else:
        seq_len = 32
    new_header = cache_header(checkpoint, target, seq_len)
    assert [k for k in header if header[k] != new_header[k]] == [change]
    hint = f"python entropy.py --init_from {checkpoint} --target_data {target} --seq_len {seq_len}"
    with pytest.raises(ValueError, match=re.escape(hint)) as error:
        load_entropy_cache(path, new_header, hint)
    assert f"its {change} is" in str(error.value)


def test_checkpoint_fingerprint_follows_the_weights(tmp_path):
    save_checkpoint(tmp_path, 0)
    fingerprint = checkpoint_fingerprint(tmp_path)
    save_checkpoint(tmp_path, 0)
    assert checkpoint_fingerprint(tmp_path) == fingerprint
    model = Transformer.from_pretrained(tmp_path)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[3, 5] += 1e-3
    model.save_pretrained(tmp_path)
    assert checkpoint_fingerprint(tmp_path) != fingerprint


# ---- bad input: one line that says what and how --------------------------------------------------

ENTROPY_PY = str(Path(__file__).parents[1] / "entropy.py")


@pytest.mark.parametrize("option, expected", [
    ("--seq_len", "error: --seq_len 0 is below 1: give the window length training will use "
                  "(train.py's seq_len)"),
    ("--batch_size", "error: --batch_size 0 is below 1: give the number of windows per forward "
                     "pass (default 8; fewer use less memory)"),
], ids=["seq_len", "batch_size"])
def test_command_line_refuses_a_window_or_batch_of_zero_in_one_line(tmp_path, option, expected):
    # Not a ZeroDivisionError or range() traceback from deep inside.
    checkpoint, target = tmp_path / "base", tmp_path / "target"
    save_checkpoint(checkpoint, 0)
    prepare_target(target, 0)
    settings = {"--init_from": checkpoint, "--target_data": target, "--seq_len": SEQ_LEN,
                option: 0}
    result = subprocess.run([sys.executable, ENTROPY_PY,
                             *(str(x) for item in settings.items() for x in item)],
                            capture_output=True, text=True, timeout=600)
    assert (result.returncode, result.stderr.strip()) == (1, expected)
    assert list(target.glob("entropy_*")) == []


def test_command_line_checks_the_data_as_training_does(tmp_path):
    """The data's tokenizer and vocabulary against the model's, its files against the sha256 in
    meta.json, and meta.json's shape; each refusal writes no cache."""
    checkpoint, target = tmp_path / "base", tmp_path / "target"
    prepare_target(target, 0)
    cache = tmp_path / "cache.safetensors"
    arguments = ["--init_from", str(checkpoint), "--target_data", str(target),
                 "--seq_len", str(SEQ_LEN), "--entropy_cache", str(cache)]

    save_checkpoint(checkpoint, 0, vocab_size=200)  # the byte tokenizer's end-of-text is id 256
    with pytest.raises(ValueError, match=re.escape(f"{target}/train.bin holds token id 256, but "
                                                   "the model's vocabulary has 200 rows")):
        entropy.main(arguments)

    save_checkpoint(checkpoint, 0)
    tokens = (target / "train.bin").read_bytes()
    (target / "train.bin").write_bytes(tokens[4:8] + tokens[:4] + tokens[8:])  # same size
    with pytest.raises(ValueError, match=re.escape(f"{target / 'train.bin'} does not match the "
                                                   "sha256 in its meta.json")):
        entropy.main(arguments)

    (target / "train.bin").write_bytes(tokens)
    meta = json.loads((target / "meta.json").read_text())
    del meta["splits"]["val"]["sha256"]
    (target / "meta.json").write_text(json.dumps(meta))
    missing = re.escape(f"{target / 'meta.json'} has no 'splits.val.sha256' (expected 64 lowercase "
                        "hex digits); prepare the data again (python data/prepare.py")
    with pytest.raises(ValueError, match=missing):
        entropy.main(arguments)
    with pytest.raises(ValueError, match=missing):
        cache_header(checkpoint, target, SEQ_LEN)
    assert not cache.exists()


def test_cache_build_refuses_token_ids_beyond_the_model_vocabulary(tmp_path):
    """Called directly, as train.py does: an id past the embedding would be an IndexError on a
    CPU and a device-side assert on a GPU."""
    target = tmp_path / "target"
    prepare_target(target, 0)
    model = Transformer(ModelConfig(vocab_size=200, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=64)).eval()
    path = tmp_path / "cache.safetensors"
    with pytest.raises(ValueError, match=re.escape(f"{target / 'train.bin'} holds token id 256 in "
                                                   "window 2, but the model's vocabulary has 200 "
                                                   "rows")):
        build_entropy_cache(model, target, SEQ_LEN, path, {"format": "test"}, batch_size=4)
    assert not path.exists()


# ---- the cache file on disk ----------------------------------------------------------------------

def test_cache_file_follows_the_umask_and_a_failed_write_leaves_no_partial_file(tmp_path,
                                                                               monkeypatch):
    checkpoint, target = tmp_path / "base", tmp_path / "target"
    save_checkpoint(checkpoint, 0)
    prepare_target(target, 0)
    header = cache_header(checkpoint, target, SEQ_LEN)
    model = Transformer.from_pretrained(checkpoint).eval()
    path = tmp_path / "cache.safetensors"
    previous = os.umask(0o027)
    try:
        build_entropy_cache(model, target, SEQ_LEN, path, header, batch_size=8)
    finally:
        os.umask(previous)
    # 0666 less the umask, as any file the user writes: not safetensors' private 0600.
    assert path.stat().st_mode & 0o777 == 0o640
    written = path.read_bytes()

    def full_disk(tensors, filename, metadata):
        Path(filename).write_bytes(b"half a cache")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(entropy, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build_entropy_cache(model, target, SEQ_LEN, path, header, batch_size=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "cache.safetensors", "target"]
    assert path.read_bytes() == written  # the earlier cache, whole


def test_two_builds_of_one_cache_at_once_leave_one_readable_cache(tmp_path):
    """Two runs started together on the same data and model both find no cache and both build it:
    each writes under a name of its own and renames, so the cache is one of the two, whole."""
    checkpoint, target = tmp_path / "base", tmp_path / "target"
    save_checkpoint(checkpoint, 0)
    prepare_target(target, 0)
    path = tmp_path / "cache" / "entropy.safetensors"
    command = [sys.executable, ENTROPY_PY, "--init_from", str(checkpoint), "--target_data",
               str(target), "--seq_len", str(SEQ_LEN), "--entropy_cache", str(path),
               "--batch_size", "1"]
    builds = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    for build in builds:
        _, stderr = build.communicate(timeout=600)
        assert build.returncode == 0, stderr[-3000:]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    header = cache_header(checkpoint, target, SEQ_LEN)
    assert sorted(load_entropy_cache(path, header, "rebuild it")) == \
        ["train_entropy", "train_nll", "val_entropy", "val_nll"]
