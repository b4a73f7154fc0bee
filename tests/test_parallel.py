"""parallel.py and checkpoint.py under torchrun on the CPU (gloo): FSDP2 against DDP and one
process, activation checkpointing, resume after SIGKILL and on another number of ranks, the export
of a sharded model, and two "nodes" on one machine against one node; FSDP's mixed precision, and
the bytes each rank holds against bench.py's memory estimate."""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from bench import state_bytes
from checkpoint import read_train_state
from model import Transformer
from parallel import PARALLEL_MODES, Cluster, equal_share, mixed_precision_policy, wrap
# workspace: the shared fixture
from test_train import ROOT, TINY, args_for, records, run, workspace  # noqa: F401
from train import Config, make_optimizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def losses(out_dir, kind="train", key="train_loss"):
    return [r[key] for r in records(out_dir, kind)]


def close(a, b, tolerance=1e-5):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tolerance


def test_equal_share_gives_every_rank_as_many_batches():
    for n, world, batch in ((10, 2, 3), (7, 3, 2), (1, 2, 4), (12, 2, 3)):
        shares = [equal_share(n, rank, world, batch) for rank in range(world)]
        # The same number of forward passes on every rank.
        assert len({len(s) for s in shares}) == 1
        counted = sorted(i for s in shares for start, stop, real in s if real
                         for i in range(start, stop))
        assert counted == list(range(n))           # every item once
    assert equal_share(0, 0, 2, 4) == []


@pytest.mark.parametrize("method", ["baseline", "entrodrop"])
def test_fsdp_ddp_and_one_process_give_the_same_losses(workspace, tmp_path, method):
    # 9 validation windows of micro-batches of 2 over 2 ranks: uneven shares in every evaluation.
    settings = dict(method=method, max_steps=16, eval_interval=8, accuracy_samples=3)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"{a} + 1?", "answer": a + 1}) + "\n"
                                for a in range(3)))
    settings["accuracy_problems"] = problems
    # Built by each run.
    caches = {name: tmp_path / f"entropy_{name}.safetensors" for name in ("one", "fsdp")}
    run(args_for(workspace, tmp_path / "one", **settings, entropy_cache=caches["one"]))
    run(args_for(workspace, tmp_path / "ddp", **settings), torchrun=True)
    run(args_for(workspace, tmp_path / "fsdp", **settings, parallel="fsdp",
                 entropy_cache=caches["fsdp"]), torchrun=True)
    one, sharded = (load_file(caches[name]) for name in ("one", "fsdp"))
    # The entropy pass through the sharded model, its windows split unevenly over 2 ranks.
    for key in one:
        assert torch.allclose(one[key], sharded[key], equal_nan=True, atol=1e-3), key
    for other in ("ddp", "fsdp"):
        assert close(losses(tmp_path / "one"), losses(tmp_path / other)), other
        assert close(losses(tmp_path / "one", "eval", "val_loss"),
                     losses(tmp_path / other, "eval", "val_loss"))
        assert losses(tmp_path / "one", "eval", "accuracy") == \
            losses(tmp_path / other, "eval", "accuracy")
        # The same masks, by construction: drawn by window and step, never by rank.
        assert losses(tmp_path / "one", key="mask_rate") == losses(tmp_path / other,
                                                                   key="mask_rate")
    if method == "entrodrop":
        assert max(losses(tmp_path / "one", key="mask_rate")) > 0
    else:  # started again, every rank finds the finished run and exits cleanly without training
        again = run(args_for(workspace, tmp_path / "fsdp", **settings, parallel="fsdp",
                             entropy_cache=caches["fsdp"]), torchrun=True)
        assert "already holds this finished run" in again.stdout


def test_activation_checkpointing_recomputes_every_block_in_backward():
    """Checkpointed, a block saves nothing for backward and runs its forward a second time there;
    the gradients are the same."""
    torch.manual_seed(0)
    model = Transformer(TINY).train()
    window = torch.randint(0, TINY.vocab_size, (2, 33))
    forwards, depth = Counter(), Counter()

    # Counted on entry: a recomputation stops as soon as it has rebuilt what backward needs,
    # before the block's end.
    def enter(block, args):
        forwards[block] += 1
        depth["blocks"] += 1

    def leave(block, args, output):
        depth["blocks"] -= 1

    for block in model.layers:
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave)
    found = {}
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        forwards.clear()
        saved = Counter()

        def pack(tensor):
            where = "in blocks" if depth["blocks"] else "elsewhere"
            saved[where] += tensor.numel() * tensor.element_size()
            return tensor
        # Checkpointing's own hooks, inside ours, take what a checkpointed block saves.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(window[:, :-1], window[:, 1:])[1]
        in_forward = [forwards[block] for block in model.layers]
        model.zero_grad(set_to_none=True)
        loss.backward()
        found[recompute] = dict(in_forward=in_forward,
                                in_step=[forwards[block] for block in model.layers], saved=saved,
                                grads={n: p.grad.clone() for n, p in model.named_parameters()})
    plain, recomputed = found[False], found[True]
    layers = TINY.num_hidden_layers
    assert plain["in_forward"] == plain["in_step"] == recomputed["in_forward"] == [1] * layers
    assert recomputed["in_step"] == [2] * layers
    assert plain["saved"]["in blocks"] > 0 and recomputed["saved"]["in blocks"] == 0
    # What each checkpointed block keeps instead: its input, the fp32 (B, T, d) residual stream,
    # and the rotary tables cos and sin, (1, T, 1, head_dim) each, which all blocks share.
    tokens = window[:, :-1].numel()
    kept = tokens * TINY.hidden_size * 4 + 2 * (tokens // len(window)) * TINY.head_dim * 4
    assert recomputed["saved"]["elsewhere"] - plain["saved"]["elsewhere"] == layers * kept
    for name, grad in plain["grads"].items():
        assert torch.allclose(grad, recomputed["grads"][name], atol=1e-6), name


def test_activation_checkpointing_changes_nothing_but_memory(workspace, tmp_path):
    settings = dict(method="entrodrop", max_steps=8, eval_interval=4)
    run(args_for(workspace, tmp_path / "plain", **settings))
    run(args_for(workspace, tmp_path / "recomputed", **settings, activation_checkpointing=True))
    for parallel in PARALLEL_MODES:  # 2 ranks
        run(args_for(workspace, tmp_path / parallel, **settings, activation_checkpointing=True,
                     parallel=parallel), torchrun=True)
    assert close(losses(tmp_path / "plain"), losses(tmp_path / "recomputed"), 1e-6)
    for parallel in PARALLEL_MODES:
        assert close(losses(tmp_path / "plain"), losses(tmp_path / parallel)), parallel


def test_fsdp_gathers_bf16_weights_and_reduces_in_fp32_on_a_gpu_only():
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    policy = mixed_precision_policy(bf16=True, device=gpu)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    for bf16, device in ((True, cpu), (False, gpu), (False, cpu)):
        policy = mixed_precision_policy(bf16, device)
        # None: the weights' own dtype, fp32, for gathering and reducing alike
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None), (bf16, device)


def held_state_bytes(model, optimizer):
    """Bytes of this rank's own weights, gradients and AdamW moments (under FSDP its shards)."""
    tensors = [t for p in model.parameters()
               for t in (p, p.grad, *(optimizer.state[p][m] for m in ("exp_avg", "exp_avg_sq")))]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def one_step_on_each_rank(rank, world_size, store, results):
    """A process of torch.multiprocessing.spawn: one optimizer step of the tiny model under each
    parallel mode on world_size gloo ranks, as train.py sets it up -> (rank, {what: found}) put on
    results."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    cluster = Cluster(rank, world_size, torch.device("cpu"), distributed=True)
    found = {}
    for parallel in PARALLEL_MODES:
        torch.manual_seed(0)
        model = Transformer(TINY)
        train_model = wrap(model, parallel, cluster, compile_model=False, bf16=False)
        optimizer = make_optimizer(model, Config(), cluster.device)
        window = torch.randint(0, TINY.vocab_size, (2, 17))
        train_model(window[:, :-1], window[:, 1:])[1].backward()
        optimizer.step()
        found[parallel] = held_state_bytes(model, optimizer)
        found[f"{parallel}: tied"] = model.lm_head.weight is model.embed_tokens.weight
    results.put((rank, found))
    # The DDP wrapper's reference cycle holds the process group: free both before it is destroyed.
    del model, train_model, optimizer
    gc.collect()
    dist.destroy_process_group()


def test_each_rank_holds_the_states_that_the_memory_estimate_counts(tmp_path):
    """bench.state_bytes against the bytes of fp32 weights, gradients and AdamW moments that each of
    2 ranks holds after a step: the whole model on each under DDP; under FSDP rank 0 holds the
    larger shards (the 257-row embedding splits 129 + 128), and the two add up to the whole. The
    tied head and embedding stay one parameter when sharded."""
    results = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.spawn(one_step_on_each_rank, args=(2, tmp_path / "store", results),
                                nprocs=2)
    found = dict(results.get() for _ in range(2))
    with torch.device("meta"):
        model = Transformer(TINY)
    whole = state_bytes(model, ranks=1)
    assert whole == 16 * sum(p.numel() for p in model.parameters())
    assert found[0]["ddp"] == found[1]["ddp"] == whole
    assert found[0]["fsdp"] == state_bytes(model, ranks=2) > found[1]["fsdp"]
    assert found[0]["fsdp"] + found[1]["fsdp"] == whole
    assert all(found[rank][f"{parallel}: tied"] for rank in (0, 1) for parallel in PARALLEL_MODES)


def launch(args, nproc):
    """torchrun in the background; its workers are found later by their out_dir."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", "train.py", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)


def kill_after_checkpoint(out, launcher, step):
    """SIGKILL a torchrun job, launcher and workers, once its log is past `step`."""
    deadline = time.time() + 180
    while time.time() < deadline and not ((out / "log.jsonl").exists()
                                          and len(records(out, "train")) > step):
        time.sleep(0.01)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    subprocess.run(["pkill", "-9", "-f", f"out_dir={out}"])
    time.sleep(0.5)


def test_fsdp_resume_after_sigkill_gives_the_same_logs(workspace, tmp_path):
    settings = dict(method="entrodrop", max_steps=30, eval_interval=10, checkpoint_interval=12,
                    parallel="fsdp")
    run(args_for(workspace, tmp_path / "whole", **settings), torchrun=True)
    out = tmp_path / "killed"
    kill_after_checkpoint(out, launch(args_for(workspace, out, **settings), 2), 14)
    assert read_train_state(out / "ckpt")["loader"]["step"] == 12
    resumed = run(args_for(workspace, out, **settings, resume=True), torchrun=True)
    assert "resuming from" in resumed.stdout
    strip = lambda rs: [  # noqa: E731
        {k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")} for r in rs]
    for kind in ("train", "eval"):
        assert strip(records(tmp_path / "whole", kind)) == strip(records(out, kind)), kind


@pytest.mark.parametrize("method, before, after", [
    ("entrodrop", ("ddp", 2), ("ddp", 1)), ("entrodrop", ("ddp", 1), ("ddp", 2)),
    ("entrodrop", ("fsdp", 2), ("fsdp", 1)), ("entrodrop", ("fsdp", 1), ("fsdp", 2)),
    ("entrodrop", ("fsdp", 2), ("ddp", 1)), ("hidden_dropout", ("ddp", 2), ("ddp", 2))])
def test_resume_on_another_number_of_ranks_continues_the_run(workspace, tmp_path, method, before,
                                                             after):
    """The global batch stays the same, so the trajectory continues, sharded or not: the rows,
    masks and gamma_j are keyed by window and step, not by rank. Hidden dropout's draws are keyed
    by rank too, so on another number of ranks it draws otherwise and cannot continue exactly;
    what holds is that on the same ranks it continues exactly."""
    (parallel, ranks), (parallel_after, ranks_after) = before, after
    settings = dict(method=method, max_steps=30, eval_interval=10, checkpoint_interval=12,
                    **({"dropout": 0.1} if method == "hidden_dropout" else {}))
    # FSDP always starts under torchrun.
    torchrun = lambda mode, n: mode == "fsdp" or n > 1  # noqa: E731
    run(args_for(workspace, tmp_path / "whole", **settings, parallel=parallel),
        torchrun=torchrun(parallel, ranks), nproc=ranks)
    out = tmp_path / "moved"
    args = args_for(workspace, out, **settings, parallel=parallel)
    if torchrun(parallel, ranks):
        kill_after_checkpoint(out, launch(args, ranks), 14)
    else:
        process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        kill_after_checkpoint(out, process, 14)
    assert read_train_state(out / "ckpt")["loader"]["step"] == 12
    run(args_for(workspace, out, **settings, parallel=parallel_after, resume=True),
        torchrun=torchrun(parallel_after, ranks_after), nproc=ranks_after)
    if method == "hidden_dropout":
        assert losses(tmp_path / "whole") == losses(out)
    assert close(losses(tmp_path / "whole"), losses(out))
    assert close(losses(tmp_path / "whole", "eval", "val_loss"), losses(out, "eval", "val_loss"))


def test_fsdp_export_gives_the_ddp_export(workspace, tmp_path):
    settings = dict(method="baseline", max_steps=6, eval_interval=3)
    run(args_for(workspace, tmp_path / "ddp", **settings), torchrun=True)
    run(args_for(workspace, tmp_path / "fsdp", **settings, parallel="fsdp"), torchrun=True)
    idx = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(tmp_path / name / "best").eval()(idx).logits
                  for name in ("ddp", "fsdp")]
    assert (logits[0] - logits[1]).abs().max() <= 1e-5
    assert sorted(p.name for p in (tmp_path / "fsdp" / "best").iterdir()) == \
        sorted(p.name for p in (tmp_path / "ddp" / "best").iterdir())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_equal_one_node(workspace, tmp_path):
    settings = dict(method="entrodrop", max_steps=12, eval_interval=6)
    run(args_for(workspace, tmp_path / "one_node", **settings), torchrun=True)
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                               f"--node_rank={rank}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                               f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two_nodes",
                               "train.py",
                               *args_for(workspace, tmp_path / "two_nodes", **settings)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=ENV)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    assert close(losses(tmp_path / "one_node"), losses(tmp_path / "two_nodes"))
    assert Path(tmp_path / "two_nodes" / "best" / "model.safetensors").exists()
