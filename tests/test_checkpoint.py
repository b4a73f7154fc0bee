"""Checkpoints that survive a kill at any moment, including the moment between swap_in's two
renames, and a damaged one that is named rather than traced back."""

import subprocess
import sys

import pytest

from test_train import ROOT, args_for, records, run, workspace  # noqa: F401

def killed_after_renaming_to(name_start):
    """train.py, killed (as by SIGKILL: no cleanup) right after its first rename of a path onto a
    name that starts with name_start."""
    return f"""
import os, sys
import train
real_replace = os.replace
def replace(source, target):
    real_replace(source, target)
    if os.path.basename(str(target)).startswith({name_start!r}):
        os._exit(9)
os.replace = replace
train.main(sys.argv[1:])
"""


def test_a_kill_between_the_renames_of_a_save_resumes_from_the_earlier_checkpoint(workspace,
                                                                                  tmp_path):
    settings = dict(method="entrodrop", max_steps=15, checkpoint_interval=5, eval_interval=5)
    run(args_for(workspace, tmp_path / "whole", **settings))

    out = tmp_path / "killed"
    # Right after the second save has moved the first checkpoint aside, before it has renamed the
    # new one into place.
    killed = subprocess.run([sys.executable, "-c", killed_after_renaming_to(".ckpt.old."),
                             *args_for(workspace, out, **settings)], cwd=ROOT, timeout=600)
    assert killed.returncode == 9
    assert not (out / "ckpt").exists()  # the first checkpoint lies aside, the second unplaced
    assert [p.name[:10] for p in sorted(out.glob(".ckpt.*"))] == [".ckpt.old.", ".ckpt.step"]

    resumed = run(args_for(workspace, out, **settings, resume=True))
    assert "restored from .ckpt.old." in resumed.stdout
    assert "resuming from" in resumed.stdout and "at step 5" in resumed.stdout
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")}
                        for r in rs]
    for kind in ("train", "eval"):
        assert strip(records(tmp_path / "whole", kind)) == strip(records(out, kind))


@pytest.mark.parametrize("damage", ["no metadata", "a truncated shard"])
def test_a_damaged_checkpoint_is_named_in_one_line(workspace, tmp_path, damage):
    out = tmp_path / "run"
    settings = dict(method="baseline", max_steps=10**6, checkpoint_interval=5, eval_interval=0)
    killed = subprocess.run([sys.executable, "-c", killed_after_renaming_to("ckpt"),
                             *args_for(workspace, out, **settings)], cwd=ROOT, timeout=600)
    assert killed.returncode == 9  # right after the first checkpoint was put in place
    if damage == "no metadata":
        (out / "ckpt" / ".metadata").unlink()
    else:
        shard = next((out / "ckpt").glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    result = run(args_for(workspace, out, **settings, resume=True), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: {out / 'ckpt'} holds no readable model and optimizer state")
