"""Nothing lost, nothing silent: a locked run folder, every number checked where it enters, data
checked against its meta.json, an error that says what and how for each bad input, and durable
writes. Each test reproduces a failure a user met, and fails without its fix."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from parallel import Cluster
from checkpoint import read_train_state, write_durably
from data.loader import load_meta, read_windows
from model import replace_durably
# workspace: the shared fixture
from test_train import ROOT, args_for, records, run, workspace  # noqa: F401


def start(args):
    # A shell's background job ignores SIGINT, and so would a child of it: Ctrl-C is made to
    # count again.
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_step(out_dir, step, process, timeout=120):
    log, deadline = Path(out_dir) / "log.jsonl", time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if log.exists() and any(r.get("step", 0) >= step
                                for r in map(json.loads, log.read_text().splitlines()[:-1])):
            return
        time.sleep(0.01)
    raise AssertionError(f"{out_dir} never reached step {step}")


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")} for r in rows]


# ---- 1. one run per folder --------------------------------------------------------------------

def test_a_second_run_in_the_same_folder_is_refused_at_once_and_the_first_is_untouched(workspace,
                                                                                        tmp_path):
    settings = dict(method="baseline", max_steps=150, eval_interval=50)
    run(args_for(workspace, tmp_path / "alone", **settings))
    first = start(args_for(workspace, tmp_path / "shared", **settings))
    wait_for_step(tmp_path / "shared", 2, first)
    began = time.time()
    with pytest.raises(ValueError, match=rf"out_dir={re.escape(str(tmp_path / 'shared'))} is in "
                                         rf"use by pid {first.pid} on .* since .*: train.py"):
        train.main(args_for(workspace, tmp_path / "shared", **settings, learning_rate=1e-3,
                            min_lr=1e-3))
    assert time.time() - began < 1.0  # at once: before anything is loaded
    first.communicate(timeout=600)
    assert first.returncode == 0
    for kind in ("config", "train", "eval"):
        alone, shared = records(tmp_path / "alone", kind), records(tmp_path / "shared", kind)
        if kind == "config":
            alone, shared = ([{**r, "out_dir": None} for r in alone],
                             [{**r, "out_dir": None} for r in shared])
        assert strip_timing(alone) == strip_timing(shared), kind
    for name in ("model.safetensors", "config.json"):  # the exported model, byte for byte
        assert ((tmp_path / "alone" / "best" / name).read_bytes()
                == (tmp_path / "shared" / "best" / name).read_bytes()), name
    # The lock went with the process.
    again = run(args_for(workspace, tmp_path / "shared", **settings))
    assert "already holds this finished run" in again.stdout


def test_orphaned_workers_of_a_killed_torchrun_cannot_race_a_resume(workspace, tmp_path):
    out = tmp_path / "orphans"
    args = args_for(workspace, out, method="baseline", max_steps=10**6, eval_interval=0,
                    checkpoint_interval=5)
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", "train.py", *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_step(out, 6, launcher)
        launcher.send_signal(signal.SIGKILL)  # torch does not stop the workers of a killed launcher
        launcher.wait(timeout=60)
        holder = int(re.match(r"pid (\d+)", (out / ".lock").read_text())[1])
        os.kill(holder, 0)  # rank 0 still runs, an orphan
        resumed = run(args + ["--resume=True"], check=False)
        assert resumed.returncode == 1 and f"is in use by pid {holder} " in resumed.stderr
    finally:  # the orphans: each worker runs in a session of its own
        subprocess.run(["pkill", "-9", "-f", f"out_dir={out}"], timeout=60)


# ---- 2. every number is checked where it enters -----------------------------------------------

ONE_PROCESS = Cluster(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
NUMERIC = [f.name for f in dataclasses.fields(train.Config) if f.type in (int, float, float | str)]


def test_every_numeric_setting_has_a_range():
    assert sorted(train.NUMBER_RANGES) == sorted(NUMERIC)


@pytest.mark.parametrize("key, value, interval", [
    ("max_steps", -3, "[0, inf)"), ("global_batch_size", -4, "[1, inf)"),
    ("global_batch_size", 0, "[1, inf)"), ("micro_batch_size", 0, "[1, inf)"),
    ("seq_len", 0, "[1, inf)"), ("checkpoint_interval", 0, "[1, inf)"),
    ("log_interval", 0, "[1, inf)"), ("learning_rate", 0.0, "(0, inf)"), ("beta2", 1.0, "[0, 1)"),
    ("dropout", 1.0, "[0, 1)"), ("epochs", float("nan"), "[0, inf)"),
    ("curriculum_midpoint", float("inf"), "(-inf, inf)"),
    ("seed", -1, "[0, 1e18]"), ("export_every", -1, "[0, inf)"), ("gamma_max", 1.5, "[0, 1]"),
])
def test_out_of_range_values_are_refused_by_name(key, value, interval):
    config = dataclasses.replace(train.Config(), **{key: value})
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r} is out of range: it must "
                                                   f"lie in {interval}")):
        train.validate(config, ONE_PROCESS)


def accepted_values(key, interval):
    """The ends of an interval (or as near as an open end allows), as validate() must accept
    them."""
    low, high = (float(b) for b in interval[1:-1].split(","))
    whole = isinstance(getattr(train.Config(), key), int)
    nudge = 1 if whole else 1e-6
    lowest = -1e6 if not np.isfinite(low) else low if interval[0] == "[" else low + nudge
    highest = (lowest + 1e6 if not np.isfinite(high) else high if interval[-1] == "]"
               else high - nudge)
    return [int(v) if whole else v for v in (lowest, highest)]


def runnable(key, value, tmp_path):
    """Settings that put `key` at `value` in a run of a few steps: knobs go with the method that
    owns them, and settings that only make a run longer or bigger (the step count, batch and window
    sizes) are capped, since a huge value there is slow but not wrong."""
    settings = {**dict(method="baseline", max_steps=3, eval_interval=2, global_batch_size=4,
                       micro_batch_size=2, seq_len=16), key: value}
    owners = {"weight_decay": "weight_decay", "dropout": "hidden_dropout",
              "neftune_alpha": "neftune", "gamma_max": "entrodrop", "gate_percentile": "entrodrop",
              "curriculum_sharpness": "entrodrop", "curriculum_midpoint": "entrodrop"}
    if key in owners and value > 0 or key in ("curriculum_sharpness", "curriculum_midpoint"):
        settings["method"] = owners[key]
    if key == "max_steps":
        settings.update(max_steps=min(value, 3), epochs=0.05)
    if key == "epochs":
        settings.update(max_steps=0, epochs=min(value, 0.05) or 0.05)
    if key in ("seq_len", "global_batch_size", "micro_batch_size"):
        settings[key] = min(value, 64)
    if key in ("global_batch_size", "micro_batch_size"):
        settings["global_batch_size"] = settings["micro_batch_size"] = settings[key]
    if key == "min_lr":
        settings["learning_rate"] = max(value, 3e-3)
    if key == "learning_rate":
        settings["min_lr"] = min(value, 1e-6)
    if key == "accuracy_samples" and value > 0:
        problems = tmp_path / "problems.jsonl"
        problems.write_text(json.dumps({"question": "1 + 1?", "answer": 2}) + "\n")
        settings["accuracy_problems"] = problems
    return settings


@pytest.mark.parametrize("key", NUMERIC)
def test_no_accepted_value_crashes_later_or_loops_forever(key, workspace, tmp_path):
    """Every numeric setting at both ends of its range trains and stops; the only stop allowed
    short of the end is the deliberate one of a loss that is no longer finite (a learning rate of
    1e6)."""
    for i, value in enumerate(accepted_values(key, train.NUMBER_RANGES[key])):
        settings = runnable(key, value, tmp_path)
        train.validate(dataclasses.replace(train.Config(), **settings), ONE_PROCESS)
        try:
            train.main(args_for(workspace, tmp_path / f"run{i}", **settings))
        except train.TrainingStopped as stop:
            assert str(stop).startswith("non-finite training"), (key, value, stop)
        assert records(tmp_path / f"run{i}", "eval"), (key, value)


def test_accuracy_samples_need_problems(workspace, tmp_path):
    with pytest.raises(ValueError, match="accuracy_samples=4 needs accuracy_problems"):
        train.main(args_for(workspace, tmp_path / "run", accuracy_samples=4))


def test_sharding_without_torchrun_is_refused_before_anything_loads(workspace, tmp_path):
    with pytest.raises(ValueError, match="parallel='fsdp' shards over the ranks of torchrun"):
        train.main(args_for(workspace, tmp_path / "run", parallel="fsdp",
                            init_from=tmp_path / "no such model"))
    assert not (tmp_path / "run").exists()


# ---- 3. data is checked against its meta.json -------------------------------------------------

def copy_folder(source, target):
    """A data folder's own files, without the entropy caches that earlier tests left beside them."""
    target.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


# A truncated file, and one whose size is no whole token.
@pytest.mark.parametrize("cut", [4 * 100, 3])
def test_truncated_data_is_refused_at_load_naming_the_file(workspace, tmp_path, cut):
    data = copy_folder(workspace / "math", tmp_path / "math")
    content = (data / "train.bin").read_bytes()
    (data / "train.bin").write_bytes(content[:-cut])
    with pytest.raises(ValueError,
                       match=re.escape(str(data / "train.bin")) + ": meta.json records .* tokens"):
        train.main(args_for(workspace, tmp_path / "run", target_data=data))


def test_changed_data_of_the_same_size_does_not_reuse_a_stale_entropy_cache(workspace, tmp_path):
    data = copy_folder(workspace / "math", tmp_path / "math")
    # Builds the cache.
    train.main(args_for(workspace, tmp_path / "first", target_data=data, max_steps=1))
    tokens = np.fromfile(data / "train.bin", dtype=np.uint32)
    tokens[10:20] = tokens[30:40]  # other text, same size, same ids in range
    tokens.tofile(data / "train.bin")
    with pytest.raises(ValueError,
                       match=re.escape(str(data / "train.bin")) + " does not match the sha256"):
        train.main(args_for(workspace, tmp_path / "second", target_data=data, max_steps=1))


def test_token_ids_beyond_the_vocabulary_name_the_file(workspace, tmp_path):
    """meta.json was not updated after the data changed: its checks pass, the windows' do not."""
    data = copy_folder(workspace / "math", tmp_path / "math")
    for split in ("train", "val"):
        tokens = np.fromfile(data / f"{split}.bin", dtype=np.uint32)
        tokens[40] = 300  # the model has 257 rows
        tokens.tofile(data / f"{split}.bin")
    with pytest.raises(ValueError, match=re.escape(str(data / "val.bin")) + " holds token id 300 "
                                         "in window 1, but the model's vocabulary has 257 rows"):
        train.main(args_for(workspace, tmp_path / "run", target_data=data))
    with pytest.raises(ValueError, match=re.escape(str(data / "train.bin")) + " holds token id 300 "
                                         "in window 1"):
        # As the loader reads every training window.
        read_windows(data, "train", 32, [0, 1, 2], vocab_size=257)


def test_empty_general_validation_split_is_named(workspace, tmp_path):
    data = copy_folder(workspace / "general", tmp_path / "general")
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["val"].update(tokens=0, documents=0)
    (data / "meta.json").write_text(json.dumps(meta))
    (data / "val.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(data)) + "/val.bin is shorter than one "
                                         "window .* general_eval_windows=0"):
        train.main(args_for(workspace, tmp_path / "run", general_data=data))
    train.main(args_for(workspace, tmp_path / "run", general_data=data, general_eval_windows=0,
                        max_steps=1))
    assert records(tmp_path / "run", "eval")[0]["general_val_loss"] is None


# ---- 4. errors say what and how ---------------------------------------------------------------

def test_invalid_meta_json_names_its_path(workspace, tmp_path):
    data = copy_folder(workspace / "math", tmp_path / "math")
    (data / "meta.json").write_text('{"format": "entrodrop-tokens-v1", "spl')
    with pytest.raises(ValueError,
                       match=re.escape(str(data / "meta.json")) + " is not a valid meta.json"):
        load_meta(data)


def test_unreadable_entropy_cache_and_empty_checkpoint(workspace, tmp_path):
    data = copy_folder(workspace / "math", tmp_path / "math")
    train.main(args_for(workspace, tmp_path / "first", target_data=data, max_steps=1))
    cache = next(data.glob("entropy_*.safetensors"))
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.raises(ValueError,
                       match=f"entropy cache {re.escape(str(cache))} is unreadable .* delete it"):
        train.main(args_for(workspace, tmp_path / "second", target_data=data, max_steps=1))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "ckpt").mkdir(parents=True)
    (tmp_path / "empty" / "ckpt" / "train_state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="ckpt is not a readable checkpoint .* empty or truncated"):
        train.main(args_for(workspace, tmp_path / "empty", resume=True))


def test_out_dir_that_cannot_be_used_is_named_before_the_model_loads(workspace, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    result = run(args_for(workspace, tmp_path / "a_file", init_from=tmp_path / "no_such_model"),
                 check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: out_dir={tmp_path / 'a_file'} cannot be used "
                                     "(File exists); choose a folder that can be written")


def test_prepare_names_a_field_of_the_wrong_type_and_a_template_path_that_is_not_there(tmp_path):
    records_file = tmp_path / "in.jsonl"
    records_file.write_text(json.dumps({"question": "How many?", "answer": 42,
                                        "tags": ["a"]}) + "\n")

    def prepare(*extra):
        return subprocess.run([sys.executable, "data/prepare.py", "--input", str(records_file),
                               "--tokenizer", "byte", "--out", str(tmp_path / "out"), *extra],
                              cwd=ROOT, capture_output=True, text=True)
    assert prepare("--format", "gsm8k").returncode == 0  # a numeric answer is written out as text
    assert load_meta(tmp_path / "out")["splits"]["train"]["documents"] == 1
    records_file.write_text(json.dumps({"question": "How many?", "answer": ["42"]}) + "\n")
    result = prepare("--format", "gsm8k")
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {records_file}, line 1: field 'answer' is a list, but format 'gsm8k' reads text "
        "or a number from it; give --template to say how to write the record out")
    result = prepare("--template", "Q: {question}\nA: {meta[source]}")
    assert result.returncode == 1
    assert "--template names a field the record does not have (KeyError: 'meta')" in result.stderr


# ---- 5. the non-finite stop tells the truth ---------------------------------------------------

def test_non_finite_stop_before_any_checkpoint_is_one_plain_line(workspace, tmp_path):
    result = run(args_for(workspace, tmp_path / "run", method="baseline", learning_rate=1e30,
                          min_lr=1e30, grad_clip=0.0, eval_interval=0), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # After the entropy cache's progress bar, if it was built.
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite training at step ")
    assert result.stderr.count("error:") == 1
    assert "no checkpoint was saved yet" in line and "intact" not in line


# ---- 6. durability -----------------------------------------------------------------------------

def test_renamed_files_are_on_disk_first_and_follow_the_umask(tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(str(a)), real_replace(a, b)))
    previous = os.umask(0o027)
    try:
        path = tmp_path / "config.json"
        write_durably(path, "{}")
        assert synced == renamed == [str(path.with_name(f"config.json.{os.getpid()}.tmp"))]
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(2)}, str(tmp_path / "cache.tmp"))
        replace_durably(tmp_path / "cache.tmp", tmp_path / "cache.safetensors")
        # 0666 less the umask, not 0600.
        assert (tmp_path / "cache.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)


def test_sigint_says_in_one_line_how_many_steps_will_be_redone(workspace, tmp_path):
    out = tmp_path / "run"
    process = start(args_for(workspace, out, method="baseline", max_steps=10**6, eval_interval=0,
                             checkpoint_interval=5))
    try:
        wait_for_step(out, 8, process)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=600)
    finally:  # a run of 10**6 steps left behind by a failed wait would never end
        process.kill()  # nothing once it has exited
    assert process.returncode == 1, (process.returncode, stdout[-2000:], stderr[-2000:])
    saved = read_train_state(out / "ckpt")["loader"]["step"]
    # After the entropy cache's progress bar, if it was built.
    line = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr and stderr.count("error:") == 1, stderr
    match = re.fullmatch(r"error: interrupted at step (\d+); the (\d+) steps since the checkpoint "
                         r"at step (\d+) will be redone with --resume=True", line)
    assert match, line
    assert int(match[3]) == saved and int(match[1]) - saved == int(match[2])


def test_sigint_before_training_began_is_one_line(workspace, tmp_path):
    """Ctrl-C while the model loads: train.py run as a script, its model loader made to stop as
    an interrupt would stop it."""
    script = ("import runpy, sys\n"
              "import model\n"
              "def interrupted(*args, **kwargs):\n"
              "    raise KeyboardInterrupt\n"
              "model.Transformer.from_pretrained = interrupted\n"
              "sys.argv = ['train.py', *sys.argv[1:]]\n"
              "runpy.run_path('train.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script,
                             *args_for(workspace, tmp_path / "run", method="baseline")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: interrupted before training began; no step is lost: run the same command again "
        "(with --resume=True if it was resuming)"]


# ---- 7. resuming with another micro-batch -----------------------------------------------------

def test_resume_with_another_micro_batch_continues_the_run(workspace, tmp_path):
    # Killed past its first checkpoint (step 15), with 40 steps to go, so that on busy cores the run
    # cannot finish before the kill lands.
    settings = dict(method="entrodrop", max_steps=60, eval_interval=10, checkpoint_interval=15)
    run(args_for(workspace, tmp_path / "whole", **settings))
    out = tmp_path / "split"
    process = start(args_for(workspace, out, **settings))
    wait_for_step(out, 17, process)
    process.kill()
    process.wait()
    assert not read_train_state(out / "ckpt")["finished"]
    resumed = run(args_for(workspace, out, **settings, micro_batch_size=4, resume=True))
    assert "resuming from" in resumed.stdout
    whole, split = records(tmp_path / "whole", "train"), records(out, "train")
    # The same masks: keyed by window.
    assert [r["mask_rate"] for r in whole] == [r["mask_rate"] for r in split]
    # Another micro-batch sums the same gradients in another order: fp32 rounding that grows to
    # about 1e-5 over the 45 resumed steps; the losses of different batches differ by tenths.
    for a, b in zip(whole, split):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-4
