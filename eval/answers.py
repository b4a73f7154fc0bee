"""evaluate.py's answer rules for lm-eval tasks, so that both score a generation alike: the
extraction as a filter, and for GSM8K the reference and the worked examples of evaluate.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for evaluate.py
from evaluate import EXEMPLARS, extract_answer, reference_answer  # noqa: E402


def extract_embedded(responses, docs):
    """responses: per document, its generations -> per document, the extracted answers
    ("" for none)."""
    return [[extract_answer(text, "embedded") or "" for text in texts] for texts in responses]


def extract_gsm8k(responses, docs):
    return [[extract_answer(text, "gsm8k") or "" for text in texts] for texts in responses]


def gsm8k_reference(doc):
    """The number after "####", normalized as evaluate.py does ("1,250" -> "1250",
    "3.50" -> "3.5"): lm-eval's exact match compares it with the filter's output as a string."""
    return reference_answer(doc, "gsm8k", f"the problem {doc['question'][:60]!r}")


def gsm8k_exemplars():
    """evaluate.py's worked examples, in its order, as lm-eval's few-shot samples."""
    return [{"question": question, "answer": answer} for question, answer in EXEMPLARS]
