"""evaluate.py's answer rule as an lm-eval filter, so that both score a generation alike."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for evaluate.py
from evaluate import extract_answer  # noqa: E402


def extract_embedded(responses, docs):
    """responses: per document, its generations -> per document, the extracted answers
    ("" for none)."""
    return [[extract_answer(text, "embedded") or "" for text in texts] for texts in responses]
