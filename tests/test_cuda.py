"""The GPU path, on a GPU: logits against transformers in fp32 and under bf16 autocast, a compiled
training step, fused AdamW, the entropy cache, kill and resume, and DDP over NCCL. Marked `cuda`:
on a machine without one they are skipped, and reported as skipped; `make gpu-check` runs them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint import read_train_state
from entropy import build_entropy_cache, cache_header, load_entropy_cache
from model import ModelConfig, Transformer
from test_model import TINY, hf_model, training_step
# workspace: the shared fixture
from test_train import ROOT, args_for, records, run, workspace  # noqa: F401

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def test_logits_match_transformers_on_cuda_in_fp32_and_under_bf16_autocast(tmp_path):
    reference = hf_model("qwen3_tied")
    reference.save_pretrained(tmp_path)
    reference = reference.to(CUDA)
    ours = Transformer.from_pretrained(tmp_path, device=CUDA).eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 41), device=CUDA)
    with torch.no_grad():
        exact = reference(idx).logits
        assert (ours(idx) - exact).abs().max().item() <= 1e-4
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours_bf16, theirs_bf16 = ours(idx).float(), reference(idx).logits.float()
    # bf16 rounds; ours may not stray further from fp32 than transformers' own bf16 path does.
    assert (ours_bf16 - exact).abs().max() <= 2 * (theirs_bf16 - exact).abs().max() + 1e-3


def test_compiled_training_step_on_cuda_is_one_graph_with_the_eager_gradients():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY)).to(CUDA)
    idx, targets = torch.randint(0, 300, (2, 2, 40), device=CUDA).unbind(0)
    fill_mask = torch.rand(2, 40, device=CUDA) < 0.3
    explanation = torch._dynamo.explain(model)(idx, targets, fill_mask=fill_mask)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), \
        explanation.break_reasons
    eager_loss, eager_grads = training_step(model, idx, targets, fill_mask)
    # Inductor, Triton kernels.
    compiled_loss, compiled_grads = training_step(torch.compile(model), idx, targets, fill_mask)
    assert abs(compiled_loss - eager_loss) <= 1e-5 * abs(eager_loss)
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_fused_adamw_matches_the_per_parameter_loop():
    torch.manual_seed(0)
    models = [Transformer(ModelConfig(**TINY)).to(CUDA) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                    weight_decay=0.1, **kind)
                  for m, kind in zip(models, ({"fused": True}, {"foreach": False}))]
    idx, targets = torch.randint(0, 300, (2, 2, 40), device=CUDA).unbind(0)
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad(set_to_none=True)
            model(idx, targets)[1].backward()
            optimizer.step()
    for (name, fused), (_, looped) in zip(models[0].named_parameters(),
                                          models[1].named_parameters()):
        assert torch.allclose(fused, looped, rtol=1e-5, atol=1e-7), name


def test_entropy_cache_on_cuda_matches_the_cpu_one(workspace, tmp_path):  # noqa: F811
    """Stored as float16, whose step at 5 nats is 0.004: the fp32 GPU cache agrees with the CPU one
    to within two such steps; under bf16 autocast (as train.py builds it on a GPU) to within
    2% + 0.02."""
    header = cache_header(workspace / "base", workspace / "math", 32)
    caches = {}
    for name, device, autocast in (("cpu", "cpu", False), ("cuda", "cuda", False),
                                   ("cuda_bf16", "cuda", True)):
        model = Transformer.from_pretrained(workspace / "base", device=device).eval()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            build_entropy_cache(model, workspace / "math", 32, tmp_path / f"{name}.safetensors",
                                header, batch_size=8)
        caches[name] = load_entropy_cache(tmp_path / f"{name}.safetensors", header, "")
    for key, reference in caches["cpu"].items():
        scored = ~torch.isnan(reference)
        assert torch.equal(scored, ~torch.isnan(caches["cuda"][key]))
        assert (caches["cuda"][key][scored] - reference[scored]).abs().max() <= 0.008, key
        assert ((caches["cuda_bf16"][key][scored] - reference[scored]).abs()
                <= 0.02 * reference[scored].abs() + 0.02).all(), key


def test_kill_and_resume_on_cuda_continues_the_run(workspace, tmp_path):  # noqa: F811
    """bf16 autocast, as a GPU run trains. CUDA's atomic adds (the embedding's backward) do not fix
    the order of a sum, so the two runs agree closely rather than bitwise."""
    extra = dict(method="entrodrop", epochs=3.0, checkpoint_interval=40, eval_interval=20,
                 device="cuda")
    run(args_for(workspace, tmp_path / "whole", **extra))
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "train.py",
                                *args_for(workspace, interrupted, **extra)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = interrupted / "log.jsonl", time.time() + 300
    while time.time() < deadline and not (log.exists() and len(records(interrupted, "train")) > 50):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_train_state(interrupted / "ckpt")["loader"]["step"] == 40
    assert "resuming from" in run(args_for(workspace, interrupted, **extra, resume=True)).stdout
    for kind in ("train", "eval"):
        whole, resumed = records(tmp_path / "whole", kind), records(interrupted, kind)
        assert [r["step"] for r in whole] == [r["step"] for r in resumed]
        key = "train_loss" if kind == "train" else "val_loss"
        assert max(abs(a[key] - b[key]) for a, b in zip(whole, resumed)) <= \
            2e-2 * max(r[key] for r in whole)


def test_ddp_over_nccl_matches_one_process(workspace, tmp_path):  # noqa: F811
    settings = dict(method="entrodrop", max_steps=24, eval_interval=8, device="cuda",
                    dtype="float32")
    run(args_for(workspace, tmp_path / "single", **settings))
    run(args_for(workspace, tmp_path / "ddp", **settings), torchrun=True, nproc=1)
    for kind, key in (("train", "train_loss"), ("eval", "val_loss")):
        for a, b in zip(records(tmp_path / "single", kind), records(tmp_path / "ddp", kind)):
            assert abs(a[key] - b[key]) <= 1e-5, (a, b)
    assert os.path.exists(tmp_path / "ddp" / "best" / "model.safetensors")
    assert Path(tmp_path / "ddp" / "log.jsonl").read_text().count('"kind": "train"') == 24


def test_fsdp_on_one_gpu_with_bf16_and_compile_follows_ddp(workspace, tmp_path):  # noqa: F811
    """FSDP's mixed precision (bf16 weights in forward and backward, fp32 gradient reduction) and a
    compiled block against DDP under bf16 autocast: the same run within bf16's precision; the tied
    head and embedding stay one parameter in the export."""
    settings = dict(method="entrodrop", max_steps=24, eval_interval=8, device="cuda",
                    dtype="bfloat16")
    run(args_for(workspace, tmp_path / "ddp", **settings), torchrun=True, nproc=1)
    run(args_for(workspace, tmp_path / "fsdp", **settings, parallel="fsdp", compile=True),
        torchrun=True, nproc=1)
    for kind, key in (("train", "train_loss"), ("eval", "val_loss")):
        for a, b in zip(records(tmp_path / "ddp", kind), records(tmp_path / "fsdp", kind)):
            assert abs(a[key] - b[key]) <= 0.02 * abs(a[key]), (a, b)
    exported = load_file(tmp_path / "fsdp" / "best" / "model.safetensors")
    assert "lm_head.weight" not in exported and "model.embed_tokens.weight" in exported
