import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import PurePosixPath

import pytest

from data.embedded import (
    Problem,
    format_problem,
    generate_problems,
    make_splits,
    sample_problem,
    stdlib_documents,
)
from data.problem_families import _FEMALE_NAMES, _MALE_NAMES, FAMILIES

CALCULATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return generate_problems(3000, seed=0)


def evaluate(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    assert a % b == 0, f"{a} / {b} is not exact"
    return a // b


def test_same_seed_same_problems_and_different_seed_different_problems():
    assert generate_problems(200, seed=5) == generate_problems(200, seed=5)
    assert generate_problems(200, seed=5) != generate_problems(200, seed=6)


def test_generation_leaves_the_global_random_state_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_problems(50, seed=1)
    assert random.random() == expected


def test_a_longer_list_starts_with_the_shorter_one():
    assert generate_problems(300, seed=2)[:100] == generate_problems(100, seed=2)


def test_repeated_questions_are_skipped():
    rng = random.Random(0)
    raw = [sample_problem(rng).question for _ in range(20_000)]
    assert len(set(raw)) < len(raw), "no repeats drawn, so the check below would prove nothing"
    problems = generate_problems(20_000, seed=0)
    assert len({p.question for p in problems}) == len(problems) == 20_000


def test_all_families_appear_with_two_to_five_steps(problems):
    assert len(FAMILIES) >= 20
    steps_by_family = defaultdict(set)
    for p in problems:
        steps_by_family[p.family].add(len(p.steps))
    assert set(steps_by_family) == set(FAMILIES)
    for family, counts in steps_by_family.items():
        assert counts <= {2, 3, 4, 5}, (family, counts)
    varied = [family for family, counts in steps_by_family.items() if len(counts) > 1]
    assert len(varied) >= 10


def test_families_are_mixed_roughly_uniformly(problems):
    counts = Counter(p.family for p in problems)
    expected = len(problems) / len(FAMILIES)
    assert min(counts.values()) > 0.6 * expected
    assert max(counts.values()) < 1.4 * expected


def test_every_step_has_exactly_one_correct_calculation(problems):
    for p in problems:
        last = None
        for step in p.steps:
            found = CALCULATION.findall(step)
            assert len(found) == 1 and step.count("=") == 1, step
            a, op, b, c = found[0]
            assert evaluate(int(a), op, int(b)) == int(c), step
            assert int(c) > 0
            last = int(c)
        assert p.answer == last, p


def test_every_intermediate_result_feeds_a_later_step(problems):
    for p in problems:
        calculations = [CALCULATION.search(step).groups() for step in p.steps]
        for i, (_, _, _, result) in enumerate(calculations[:-1]):
            later_operands = {operand for a, _, b, _ in calculations[i + 1:] for operand in (a, b)}
            assert result in later_operands, p


def test_format_problem_layout(problems):
    for p in problems[:300]:
        text = format_problem(p)
        assert text.startswith("Question: ")
        assert text.endswith(f"The answer is {p.answer}.")
        lines = text.split("\n")
        assert lines[0] == f"Question: {p.question}"
        assert lines[1] == f"Answer: {p.steps[0]}"
        assert lines[2:-1] == list(p.steps[1:])
        assert len(lines) == len(p.steps) + 2


def test_numbers_stay_moderate(problems):
    numbers = [int(n) for p in problems for step in p.steps for n in re.findall(r"\d+", step)]
    assert sum(n < 1000 for n in numbers) / len(numbers) > 0.95
    assert max(numbers) < 10_000


def test_questions_and_names_vary():
    rng = random.Random(0)
    drawn = [sample_problem(rng) for _ in range(2000)]
    assert len({p.question for p in drawn}) / len(drawn) >= 0.95
    names = set(re.findall(r"\b[A-Z][a-z]+\b", " ".join(p.question for p in drawn)))
    assert len(names & set(_FEMALE_NAMES + _MALE_NAMES)) >= 30
    # Several phrasings: with numbers and names masked, questions still take many forms.
    shapes = {re.sub(r"\d+", "#", p.question.split(" ", 1)[1]) for p in drawn}
    assert len(shapes) > 500


def test_splits_are_disjoint_sized_and_deterministic():
    sizes = dict(n_train=300, n_val=50, n_test=100, n_pool=1000)
    splits = make_splits(seed=3, **sizes)
    assert {name: len(split) for name, split in splits.items()} == {"train": 300, "val": 50,
                                                                     "test": 100, "pool": 1000}
    questions = [{p.question for p in split} for split in splits.values()]
    assert sum(len(q) for q in questions) == len(set().union(*questions))
    assert make_splits(seed=3, **sizes) == splits
    assert make_splits(seed=4, **sizes)["test"] != splits["test"]


def test_pool_size_does_not_change_the_other_splits():
    small = make_splits(seed=3, n_train=100, n_val=20, n_test=30, n_pool=50)
    large = make_splits(seed=3, n_train=100, n_val=20, n_test=30, n_pool=500)
    for name in ("train", "val", "test"):
        assert small[name] == large[name]


def test_the_demo_data_is_the_same_as_ever():
    """The problems behind `make demo` (data/embedded.py --n_train 100, other sizes default) are
    pinned by a checksum, so that refactoring the generator cannot quietly change the demo's
    data and with it every number the demo reports."""
    splits = make_splits(seed=0, n_train=100, n_val=100, n_test=200, n_pool=4000)
    documents = {name: [dict(asdict(p), text=format_problem(p)) for p in split]
                 for name, split in splits.items()}
    digest = hashlib.sha256(json.dumps(documents, sort_keys=True).encode()).hexdigest()
    assert digest == "9108a12c0ad3d8be6f7ed1ba8817177f0d06b1c8d5d296ab21ef01da1fddb233"


@pytest.fixture(scope="module")
def stdlib() -> list[tuple[str, str]]:
    return stdlib_documents()


def test_stdlib_documents_are_sorted_python_sources(stdlib):
    paths = [path for path, _ in stdlib]
    assert paths and paths == sorted(paths)
    assert len(set(paths)) == len(paths)
    skipped = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"}
    for path, text in stdlib:
        parts = PurePosixPath(path).parts
        assert path.endswith(".py")
        assert not skipped.intersection(parts[:-1]), path
        assert text.strip()
    assert "os.py" in paths and "json/decoder.py" in paths


def test_stdlib_is_large_enough(stdlib):
    assert sum(len(text.encode("utf-8")) for _, text in stdlib) > 5_000_000
