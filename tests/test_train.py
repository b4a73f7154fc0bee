"""train.py end to end at toy size: DDP against one process, exact resume after SIGKILL,
continual pre-training from a HF checkpoint with export, and every guard."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

import parallel
import train
from checkpoint import load_training_state, read_train_state
from data.embedded import format_problem, generate_problems, stdlib_documents
from data.loader import DatasetWriter
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=128, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny base checkpoint (HF format, byte tokenizer) and target/general data folders."""
    root = tmp_path_factory.mktemp("train")
    tokenizer = load_tokenizer("byte")
    torch.manual_seed(0)
    Transformer(TINY).save_pretrained(root / "base")
    tokenizer.save(root / "base")
    problems = generate_problems(60, seed=3)
    with DatasetWriter(root / "math", tokenizer, {"test": "math"}) as writer:
        for i, problem in enumerate(problems):
            writer.add("val" if i % 4 == 0 else "train", tokenizer.encode(format_problem(problem)))
    with DatasetWriter(root / "general", tokenizer, {"test": "general"}) as writer:
        for i, (_, text) in enumerate(stdlib_documents()[:12]):
            writer.add("val" if i == 0 else "train", tokenizer.encode(text[:20000]))
    return root


def args_for(workspace, out_dir, **overrides):
    settings = dict(init_from=workspace / "base", target_data=workspace / "math",
                    general_data=workspace / "general", out_dir=out_dir,
                    seq_len=32, global_batch_size=8, micro_batch_size=2, epochs=1.5,
                    learning_rate=3e-3, min_lr=3e-3, curriculum_midpoint=0.5, gamma_max=0.5,
                    eval_interval=20, log_interval=1, checkpoint_interval=1000)
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


def run(args, torchrun=False, check=True, nproc=2):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"] if torchrun else [sys.executable]
    # A hung run (a collective that never completes) fails the test after ten minutes rather than
    # blocking the suite: subprocess.run kills it and raises TimeoutExpired.
    result = subprocess.run([*launcher, "train.py", *args], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(out_dir, kind):
    lines = (Path(out_dir) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_two_ranks_match_one_process_with_online_scores(workspace, tmp_path):
    """Each rank refreshes the scores of its own rows, and the ranks exchange them; a window's next
    visit falls to either rank, so without the exchange the masks would differ. (The baseline and
    EntroDrop with static scores: test_parallel.py, beside FSDP.)"""
    single, double = tmp_path / "single", tmp_path / "ddp"
    # Float sums in another order drift apart as training goes on; 24 steps stay well inside 1e-5.
    # Windows of 128: 94 of them, so the last 4 steps revisit some.
    settings = dict(method="entrodrop", score_source="online", seq_len=128, max_steps=24,
                    eval_interval=8)
    run(args_for(workspace, single, **settings))                 # 1 rank x 4 micro-batches of 2
    run(args_for(workspace, double, **settings), torchrun=True)  # 2 ranks x 2 micro-batches of 2
    a, b = records(single, "train"), records(double, "train")
    assert len(a) == len(b) == 24
    print("largest loss difference",
          max(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(a, b)))
    for x, y in zip(a, b):
        assert abs(x["train_loss"] - y["train_loss"]) <= 1e-5, (x, y)
        assert x["mask_rate"] == y["mask_rate"]  # the same masks, by construction
    assert max(r["mask_rate"] for r in a) > 0
    for x, y in zip(records(single, "eval"), records(double, "eval")):
        assert abs(x["val_loss"] - y["val_loss"]) <= 1e-5


def final_state(out_dir, base):
    """A run's checkpoint as one dictionary: its train_state.pt, under "model" the weights, read
    back into a model of the base checkpoint's shape, and under "saved" the top-level names
    torch.distributed.checkpoint holds ("model", "optimizer")."""
    state = read_train_state(Path(out_dir) / "ckpt")
    model = Transformer.from_pretrained(base)
    load_training_state(Path(out_dir) / "ckpt", model)
    saved = FileSystemReader(Path(out_dir) / "ckpt").read_metadata().state_dict_metadata
    return {**state, "model": model.state_dict(), "saved": {key.split(".")[0] for key in saved}}


@pytest.mark.parametrize("method", ["entrodrop", "hidden_dropout", "entrodrop_online"])
def test_resume_after_sigkill_is_bitwise_identical(workspace, tmp_path, method):
    extra = dict(method=method, max_steps=72, checkpoint_interval=30, eval_interval=24,
                 log_interval=1)
    if method == "entrodrop_online":  # the refreshed scores travel with the checkpoint
        extra.update(method="entrodrop", score_source="online")
    if method == "hidden_dropout":
        extra["dropout"] = 0.1  # drawn from the global RNG, seeded at each step by (seed, step, rank)
    run(args_for(workspace, tmp_path / "whole", **extra))

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "train.py",
                                *args_for(workspace, interrupted, **extra)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = interrupted / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once it is past its first checkpoint (step 30)
        if log.exists() and any(r.get("step", 0) >= 36
                                for r in map(json.loads, log.read_text().splitlines()[:-1])):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = final_state(interrupted, workspace / "base")
    assert not killed["finished"] and killed["loader"]["step"] == 30
    assert killed["saved"] == {"model", "optimizer"}

    result = run(args_for(workspace, interrupted, **extra, resume=True))
    assert "resuming from" in result.stdout
    whole, resumed = (final_state(tmp_path / "whole", workspace / "base"),
                      final_state(interrupted, workspace / "base"))
    assert resumed["finished"]
    assert resumed["saved"] == {"model"}  # a finished run is never resumed: no AdamW moments
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    if method == "entrodrop_online":
        assert torch.equal(whole["online_scores"].nan_to_num(),
                           resumed["online_scores"].nan_to_num())
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")}
                        for r in rs]
    for kind in ("train", "eval"):
        assert strip(records(tmp_path / "whole", kind)) == strip(records(interrupted, kind))


def test_continual_pretraining_logs_groups_and_exports_for_transformers(workspace, tmp_path):
    out = tmp_path / "run"
    result = run(args_for(workspace, out, method="entrodrop"))
    evals = records(out, "eval")
    # Groups: this model's.
    assert evals[0]["val_loss_low"] < evals[0]["val_loss"] < evals[0]["val_loss_high"]
    assert all(r["val_loss_low"] is not None and r["val_loss_high"] is not None for r in evals)
    assert evals[-1]["best_epoch"] is not None and "done: best target val loss" in result.stdout
    assert all(0 <= r["gamma"] <= r["gamma_max_j"] <= 0.5 for r in records(out, "train"))
    cache = list((workspace / "math").glob("entropy_*_seq32.safetensors"))
    assert len(cache) == 1

    ours = Transformer.from_pretrained(out / "best")
    reference = AutoModelForCausalLM.from_pretrained(out / "best").eval()
    idx = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        assert (reference(idx).logits - ours(idx)).abs().max() <= 1e-4
    assert load_tokenizer(str(out / "best")).fingerprint == load_tokenizer("byte").fingerprint
    # A fresh base for a next run.
    assert torch.equal(ours.fill_embedding, ours.embed_tokens.weight.mean(0))

    again = run(args_for(workspace, out, method="entrodrop"))
    assert "already holds this finished run" in again.stdout


# ---- guards: each triggers with its message, before any training where it can --------------

def guard(workspace, tmp_path, match, **overrides):
    with pytest.raises((ValueError, RuntimeError), match=match):
        train.main(args_for(workspace, tmp_path / "guard", **overrides))


def test_unknown_key_and_wrong_type(workspace, tmp_path):
    guard(workspace, tmp_path, "unknown config key 'gama_max'", gama_max=0.1)
    guard(workspace, tmp_path, "'seq_len' must be a int", seq_len=3.5)
    guard(workspace, tmp_path, "'compile' must be a bool", compile="yes")


def test_invalid_method_combinations(workspace, tmp_path):
    guard(workspace, tmp_path, "method='dropconnect' must be one of", method="dropconnect")
    guard(workspace, tmp_path, "weight_decay=0.1: must be > 0 for method=weight_decay",
          weight_decay=0.1)
    guard(workspace, tmp_path, "dropout=0.0: must be > 0 for method=hidden_dropout",
          method="hidden_dropout")
    guard(workspace, tmp_path, "targeting='high' is an option of token dropout methods",
          method="baseline", targeting="high")
    guard(workspace, tmp_path, "init_from must be a checkpoint folder", init_from="scratch")


def test_batch_that_does_not_divide(workspace, tmp_path):
    guard(workspace, tmp_path, "global_batch_size=8 must be a multiple of micro_batch_size=3",
          micro_batch_size=3)


def test_sequence_longer_than_the_model(workspace, tmp_path):
    guard(workspace, tmp_path, "seq_len=256 exceeds the model's max_position_embeddings=128",
          seq_len=256)


def test_data_from_another_tokenizer(workspace, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["one two three four"] * 50, trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"]))
    other = tmp_path / "other"
    Transformer(TINY).save_pretrained(other)
    bpe.save(str(other / "tokenizer.json"))
    guard(workspace, tmp_path, "was tokenized with 'byte', whose vocabulary differs",
          init_from=other)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(workspace, tmp_path):
    out = tmp_path / "guard"
    guard(workspace, tmp_path, "non-finite training at step", method="baseline", learning_rate=1e30,
          min_lr=1e30, grad_clip=0.0, checkpoint_interval=1, eval_interval=0)
    checkpoint = final_state(out, workspace / "base")
    assert not checkpoint["finished"]
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values()
               if t.is_floating_point())


def test_existing_run_with_other_settings_is_not_overwritten(workspace, tmp_path):
    out = tmp_path / "guard"
    train.main(args_for(workspace, out, method="baseline", max_steps=2))
    guard(workspace, tmp_path, r"different settings \(learning_rate, min_lr\)", method="baseline",
          max_steps=2, learning_rate=1e-4, min_lr=1e-4)


def test_finished_run_is_reused_when_moved_or_when_an_unread_knob_changes(workspace, tmp_path,
                                                                           capsys):
    train.main(args_for(workspace, tmp_path / "first", method="baseline", max_steps=2))
    (tmp_path / "first").rename(tmp_path / "moved")
    before = (tmp_path / "moved" / "log.jsonl").read_text()
    train.main(args_for(workspace, tmp_path / "moved", method="baseline", max_steps=2,
                        curriculum_midpoint=7))
    assert "already holds this finished run" in capsys.readouterr().out
    assert (tmp_path / "moved" / "log.jsonl").read_text() == before
    train.main(args_for(workspace, tmp_path / "drop", method="entrodrop", max_steps=2))
    with pytest.raises(ValueError, match=r"different settings \(curriculum_midpoint\)"):
        train.main(args_for(workspace, tmp_path / "drop", method="entrodrop", max_steps=2,
                            curriculum_midpoint=7))


def test_curriculum_midpoint_read_off_the_baseline(workspace, tmp_path):
    train.main(args_for(workspace, tmp_path / "baseline", method="baseline", epochs=3.0,
                        eval_interval=3))
    evals = records(tmp_path / "baseline", "eval")
    expected = train.turning_epoch([r["epoch"] for r in evals], [r["val_loss"] for r in evals])
    out = tmp_path / "entrodrop"
    train.main(args_for(workspace, out, method="entrodrop", max_steps=4,
                        curriculum_midpoint=f"auto:{tmp_path / 'baseline'}"))
    assert records(out, "curriculum") == [{"kind": "curriculum", "midpoint": expected}]
    before, last = records(out, "train")[-2:]  # a step's ceiling uses the epoch it starts at
    assert last["gamma_max_j"] == \
        pytest.approx(0.5 / (1 + math.exp(-(before["epoch"] - expected))))  # Eq. (4)
    with pytest.raises(FileNotFoundError, match="nothing holds no log.jsonl with evaluations"):
        train.main(args_for(workspace, tmp_path / "e2", method="entrodrop",
                            curriculum_midpoint=f"auto:{tmp_path / 'nothing'}"))
    guard(workspace, tmp_path, "must be a number, 'auto:<baseline out_dir>' or 'patience:<P>'",
          method="entrodrop", curriculum_midpoint="late")


def test_accuracy_counts_correct_greedy_answers(workspace, monkeypatch, tmp_path):
    """evaluate() decodes the problems in batches and scores them by evaluate.py's rules."""
    tokenizer = load_tokenizer("byte")
    model = Transformer.from_pretrained(workspace / "base")
    replies = {"Question: one\nAnswer:": " 2 + 5 = 7.\nThe answer is 7.",
               "Question: two\nAnswer:": " The answer is 8.",
               "Question: three\nAnswer:": " 1,250 in all.\nQuestion: next"}

    def generate(idx, max_new_tokens, eos_id=None, pad_lengths=None, **_):  # left-padded rows
        rows = [tokenizer.encode(replies[tokenizer.decode(row[pad:])])
                for row, pad in zip(idx.tolist(), pad_lengths)]
        width = max(map(len, rows))
        return torch.cat((idx, torch.tensor([row + [eos_id] * (width - len(row))
                                             for row in rows])), dim=1)

    monkeypatch.setattr(model, "generate", generate)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                for q, a in (("one", 7), ("two", 9), ("three", "1250"))))
    config = train.Config(micro_batch_size=2)
    val = torch.randint(0, 256, (2, 33))
    sets = train.EvalSets(val, val[:1], train.read_problems(problems, "embedded"))
    cluster = parallel.Cluster(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
    results = train.evaluate(model, config, sets, tokenizer, cluster,
                             torch.autocast("cpu", enabled=False))
    assert results["accuracy"] == 2 / 3
    assert results["val_loss_low"] is None and results["val_loss"] > 0


def test_exports_every_few_epochs_and_at_the_end(workspace, tmp_path):
    out = tmp_path / "run"
    run(args_for(workspace, out, method="baseline", epochs=3.0, export_every=2))
    assert sorted(p.name for p in (out / "epochs").iterdir()) == ["2", "3"]
    final = Transformer.from_pretrained(out / "epochs" / "3")
    state = final_state(out, workspace / "base")["model"]
    # The weights training ended with.
    assert all(torch.equal(p, state[n]) for n, p in final.named_parameters())
    assert load_tokenizer(str(out / "epochs" / "2")).fingerprint == \
        load_tokenizer("byte").fingerprint
    # No temporary folders left.
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lock"]
