"""Training text that ships with the code, so the CPU demo downloads nothing.

EntroDrop is about continual pre-training on a scarce domain corpus that gets
repeated for many epochs, usually mixed with replayed general text. The demo
needs both kinds of data, and this module provides them:

* Scarce domain data: a generator of grade-school math word problems in a
  GSM8K-like format, written from scratch here::

      Question: <question>
      Answer: <step 1>
      <step 2>
      ...
      The answer is <N>.

  Every step holds exactly one calculation written ``a op b = c`` with exact
  integer arithmetic, so every solution can be checked mechanically and
  held-out accuracy can be scored by the final number, not only by loss. The
  generator is deterministic by seed and the splits share no question, so a
  test set can be held out for real. The 25 problem families it draws from
  live in data/problem_families.py.
* General replay data: the ``.py`` files of the Python standard library. It is
  real text that nobody here wrote, and every Python installation carries it.
"""

from __future__ import annotations

import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from data.problem_families import FAMILIES, FAMILY_GENERATORS  # noqa: E402


# ---------------------------------------------------------------------------
# Problems and their text form
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One word problem with its worked, step-by-step solution."""

    family: str  # the template family it was drawn from
    question: str
    steps: tuple[str, ...]  # one sentence per reasoning step, one "a op b = c" each
    answer: int  # the result of the last step


def format_problem(problem: Problem) -> str:
    """Render a problem as one training document (no trailing newline)."""
    lines = [f"Question: {problem.question}", f"Answer: {problem.steps[0]}"]
    lines += problem.steps[1:]
    lines.append(f"The answer is {problem.answer}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Drawing problems and cutting splits
# ---------------------------------------------------------------------------



def sample_problem(rng: random.Random) -> Problem:
    """Draw one problem, its family chosen uniformly, using only rng."""
    family = rng.choice(FAMILIES)
    question, steps, answer = FAMILY_GENERATORS[family](rng)
    return Problem(family=family, question=question, steps=tuple(steps), answer=answer)


def generate_problems(n: int, seed: int) -> list[Problem]:
    """n problems with distinct question texts, deterministic for (n, seed).

    Problems are drawn one after another from random.Random(seed) and repeats
    are skipped, so the first k problems are the same whatever n is.
    """
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    # Repeats are rare; the cap only turns an impossible request into an error.
    for _ in range(10 * n + 100):
        if len(problems) == n:
            break
        problem = sample_problem(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    if len(problems) < n:
        raise RuntimeError(f"could only draw {len(problems)} distinct problems out of {n}")
    return problems


def make_splits(seed: int, n_train: int, n_val: int, n_test: int,
                n_pool: int) -> dict[str, list[Problem]]:
    """Cut one deduplicated list into "train", "val", "test" and "pool".

    "train" is the scarce target set, "val" is held out for loss, "test" is
    held out for answer accuracy, and "pool" is a larger disjoint set for
    pre-training a base model. Since no question text repeats in the list, no
    question appears in two splits. The pool comes last, so its size does not
    change the other three splits.
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test, "pool": n_pool}
    problems = generate_problems(sum(sizes.values()), seed)
    splits: dict[str, list[Problem]] = {}
    start = 0
    for name, size in sizes.items():
        splits[name] = problems[start:start + size]
        start += size
    return splits


# ---------------------------------------------------------------------------
# General corpus: the Python standard library source
# ---------------------------------------------------------------------------

# Directories that are not the library proper: installed third-party packages,
# the regression tests (huge and repetitive), and the bundled IDE and 2to3 converter.
_SKIPPED_DIRECTORIES = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                                  "lib2to3", "__pycache__"})


def stdlib_documents() -> list[tuple[str, str]]:
    """(relative path, text) of the standard library's .py files, sorted by path.

    Reads the .py files under sysconfig.get_paths()["stdlib"], skipping
    installed packages (site-packages), test directories, idlelib, lib2to3 and
    __pycache__, as well as files that are empty or not valid UTF-8. Paths use
    "/" separators.

    The exact bytes depend on the Python version (and on the build, e.g. the
    generated _sysconfigdata module), so any result computed from this corpus
    does too.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _SKIPPED_DIRECTORIES.intersection(relative.parts[:-1]) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            documents.append((relative.as_posix(), text))
    documents.sort()
    return documents


# ---------------------------------------------------------------------------
# Writing the demo's data folders
# ---------------------------------------------------------------------------


def write_demo_data(out: str, seed: int, n_train: int, n_val: int, n_test: int, n_pool: int,
                    tokenizer_path: str = "byte") -> None:
    """Tokenize everything the CPU demo needs (with the built-in byte tokenizer, or a real model's)
    into out/:

    math/          the scarce target set (train) and its held-out validation problems (val),
                   plus test.jsonl: held-out questions with answers, for accuracy
    math_pool/     the larger disjoint pool, to pre-train the demo's base model (5% held out)
    general_base/  half of the standard library, replay data for that pre-training
    general/       the other half, replay data for continual pre-training
    A folder whose meta.json records the same settings is kept as it is.
    """
    import json
    import os

    from data.loader import DatasetWriter, load_meta
    from model import replace_durably
    from tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    settings = {"generator": "data/embedded.py", "seed": seed, "n_train": n_train, "n_val": n_val,
                "n_test": n_test, "n_pool": n_pool, "python": sys.version.split()[0],
                "tokenizer": tokenizer.fingerprint}
    folders = {name: Path(out) / name for name in ("math", "math_pool", "general_base", "general")}

    def written_with_these_settings(folder):
        try:
            return load_meta(folder)["source"] == settings
        except (FileNotFoundError, ValueError):  # absent, damaged or truncated: written again
            return False

    if all(map(written_with_these_settings, folders.values())) \
            and (folders["math"] / "test.jsonl").exists():
        print(f"{out}: the demo data for these settings already exists; reusing it")
        return
    splits = make_splits(seed, n_train, n_val, n_test, n_pool)
    pool_val = max(1, n_pool // 20)
    documents = {
        "math": {"train": splits["train"], "val": splits["val"]},
        "math_pool": {"train": splits["pool"][pool_val:], "val": splits["pool"][:pool_val]},
    }
    for name, split_problems in documents.items():
        with DatasetWriter(folders[name], tokenizer, settings) as writer:
            for split, problems in split_problems.items():
                for problem in problems:
                    writer.add(split, tokenizer.encode(format_problem(problem)))
    library = stdlib_documents()
    for name, parity in (("general_base", 0), ("general", 1)):
        with DatasetWriter(folders[name], tokenizer, settings) as writer:
            for i, (_, text) in enumerate(library[parity::2]):
                writer.add("val" if i % 50 == 0 else "train", tokenizer.encode(text))
    test_path = folders["math"] / "test.jsonl"
    temporary = test_path.with_name(f"test.jsonl.{os.getpid()}.tmp")
    temporary.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n"
                                 for p in splits["test"]))
    replace_durably(temporary, test_path)
    for name, folder in folders.items():
        counts = load_meta(folder)["splits"]
        print(f"{folder}: " + ", ".join(f"{s} {c['documents']:,} documents / {c['tokens']:,} tokens"
                                        for s, c in counts.items()))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Write the CPU demo's embedded data (no downloads).")
    parser.add_argument("--out", default="out/demo/data", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=300,
                        help="problems in the scarce target set")
    parser.add_argument("--n_val", type=int, default=100,
                        help="held-out problems for validation loss")
    parser.add_argument("--n_test", type=int, default=200, help="held-out problems for accuracy")
    parser.add_argument("--n_pool", type=int, default=4000,
                        help="problems for pre-training the base model")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte', or a checkpoint folder whose tokenizer to use")
    args = parser.parse_args()
    write_demo_data(args.out, args.seed, args.n_train, args.n_val, args.n_test, args.n_pool,
                    args.tokenizer)
