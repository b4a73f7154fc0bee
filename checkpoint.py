"""
Everything a training run writes to disk, and how it survives a crash:

    out_dir/.lock             held for the whole run: one run per folder at a time
    out_dir/ckpt/             the training state: model and AdamW in torch.distributed.checkpoint's
                              sharded format (each rank writes its own part; any number of ranks
                              reads it back), beside train_state.pt (the loader's counters, the best
                              evaluation, the log's length, the settings); a finished run keeps
                              the model only
    out_dir/best/, epochs/N/  exports: Hugging Face folders with the tokenizer files

Each is written whole under a temporary name, forced to disk and renamed into place, so a crash at
any moment leaves the previous version usable (tidy_out_dir puts it back if the crash fell between
the two renames of swap_in). Nothing random is saved: every draw of the run comes
from (seed, step, ...) (dropout.py, and train.py's per-step seed for hidden dropout), which is what
lets a run resume exactly, or on another number of ranks.
"""

import fcntl
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule

from model import make_durable, replace_durably

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
        raise ValueError(f"out_dir={out_dir} cannot be used ({e.strerror}); choose a folder that "
                         "can be written") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"out_dir={out_dir} is in use by {holder}; wait for that run to end or "
                         "stop it (kill its pid), or choose another out_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n")
    handle.flush()
    HELD_LOCKS.append(handle)


def write_durably(path, text):
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    replace_durably(temporary, path)


def swap_in(fresh: Path, folder: Path):
    """Put a folder written whole under a temporary name in place of folder. Its files reach the
    disk first; then the earlier folder is renamed aside, the fresh one into place, and the earlier
    one deleted. A crash leaves one of the two whole, never a mixture: between the two renames,
    only the one aside (see tidy_out_dir)."""
    stale = folder.with_name(f".{folder.name}.old.{os.getpid()}")
    make_durable(fresh)
    if folder.exists():
        os.replace(folder, stale)
    os.replace(fresh, folder)
    shutil.rmtree(stale, ignore_errors=True)


def tidy_out_dir(out_dir: Path):
    """Clear what a killed writer left in out_dir, by the run that now holds its lock, before
    anything reads it: a folder that swap_in had renamed aside (.ckpt.old.<pid>) is put back where
    nothing took its place (the newest, should there be more), and every other temporary
    (.ckpt.step<N>, .best.new.<pid>, log.jsonl.<pid>.tmp, and the like under epochs/) is deleted."""
    for parent in (out_dir, out_dir / "epochs"):
        if not parent.is_dir():
            continue
        for stale in sorted(parent.glob(".*.old.*"), key=lambda p: -p.stat().st_mtime):
            folder = parent / stale.name[1:].rpartition(".old.")[0]
            if folder.exists():
                shutil.rmtree(stale)
            else:
                os.replace(stale, folder)
                print(f"{folder} restored from {stale.name}: a run was killed while replacing it")
        for leftover in [*parent.glob(".*.new.*"), *parent.glob(".*.step*"), *parent.glob("*.tmp")]:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def read_train_state(folder: Path):
    """train_state.pt of a checkpoint, or a clear error for a damaged one."""
    try:
        return torch.load(folder / "train_state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # missing, empty or truncated
        raise ValueError(f"{folder} is not a readable checkpoint ({type(e).__name__}: {e}); it may "
                         "be empty or truncated: delete it to start this run over") from None


def save_training_state(folder: Path, model, optimizer, train_state, cluster):
    """All ranks: the model and the optimizer, as each rank holds them (whole under DDP, a shard
    under FSDP), with torch.distributed.checkpoint; rank 0 adds train_state.pt and swaps the
    folder in. A finished run is never resumed, so its last save leaves AdamW's moments out: they
    are twice the size of the weights (64 GB of an 8B model's 96)."""
    # The same name on every rank.
    fresh = folder.with_name(f".{folder.name}.step{train_state['loader']['step']}")
    if cluster.master:
        shutil.rmtree(fresh, ignore_errors=True)  # left by a save that was killed
    if cluster.distributed:
        dist.barrier()
    if train_state["finished"]:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    with single_process_quietly():
        dcp.save(state, checkpoint_id=fresh, no_dist=not cluster.distributed)
    if cluster.master:
        torch.save(train_state, fresh / "train_state.pt")
        swap_in(fresh, folder)
    if cluster.distributed:
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is in place


@contextmanager
def interrupts_held():
    """Ctrl-C (SIGINT) during a save takes effect once the save is complete:
    torch.distributed.checkpoint would otherwise turn it into a CheckpointException halfway
    through the write."""
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextmanager
def single_process_quietly():
    """Without a process group, torch.distributed.checkpoint reads and writes as one process, as it
    should here, and warns that it does so at every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def load_training_state(folder: Path, model, optimizer=None):
    """Read a checkpoint into the model (and optimizer), resharded to however many ranks there are
    now."""
    model_state, optimizer_state = (get_state_dict(model, optimizer) if optimizer
                                    else (model.state_dict(), None))
    state = {"model": model_state, **({"optimizer": optimizer_state} if optimizer else {})}
    try:
        if not (folder / ".metadata").is_file():  # else torch logs a traceback before it fails
            raise FileNotFoundError(f"no file {folder / '.metadata'}")
        with single_process_quietly():
            dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    # CheckpointException (a damaged shard) derives from BaseException, not Exception
    except (Exception, dcp.api.CheckpointException) as e:
        raise ValueError(f"{folder} holds no readable model and optimizer state "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); delete it to "
                         "start this run over") from None
    if optimizer:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    else:
        model.load_state_dict(state["model"])


def export(model, tokenizer, folder: Path, cluster):
    """All ranks: the model and its tokenizer as a Hugging Face folder, for lm-eval, OpenCompass,
    vLLM and evaluate.py, written by rank 0 under a temporary name and swapped in. A sharded model's
    full weights are gathered to rank 0 first, onto its CPU."""
    weights = None
    if isinstance(model, FSDPModule):
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
    if cluster.master:
        fresh = folder.with_name(f".{folder.name}.new.{os.getpid()}")
        model.save_pretrained(fresh, weights=weights)
        tokenizer.save(str(fresh))
        swap_in(fresh, folder)
    if cluster.distributed:
        dist.barrier()
