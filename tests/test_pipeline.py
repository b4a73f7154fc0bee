"""The `make demo` pipeline at toy size: the same commands, stage by stage, in seconds."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_demo_pipeline_end_to_end(tmp_path):
    data, base = tmp_path / "data", tmp_path / "base"
    run("data/embedded.py", "--out", data, "--n_train", 12, "--n_val", 6, "--n_test", 4,
        "--n_pool", 60)
    run("train.py", "config/demo_base.py", f"--out_dir={base}", f"--target_data={data}/math_pool",
        f"--general_data={data}/general_base", "--max_steps=12", "--eval_interval=6",
        "--seq_len=64", "--global_batch_size=4", "--micro_batch_size=4")
    assert (base / "best" / "model.safetensors").exists()
    for method in ("baseline", "entrodrop", "token_dropout"):
        run("train.py", f"--method={method}", f"--out_dir={tmp_path / method}",
            f"--init_from={base}/best", f"--target_data={data}/math",
            f"--general_data={data}/general", "--seq_len=64", "--epochs=3",
            "--global_batch_size=5", "--micro_batch_size=5", "--curriculum_midpoint=1")
    report = run("analyze.py", tmp_path, "--variance_samples", 4)
    for name in ("fig1c", "fig2a", "fig2c", "fig4", "theorem1"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 10_000, name
    assert "| EntroDrop | 1 |" in report and "| baseline | 1 |" in report
    assert "| base model |" in report and "| EntroDrop, last step |" in report  # Theorem 1 rows
    assert (tmp_path / "results.md").read_text().strip() == report.strip()
