"""
Answer accuracy by greedy decoding, the paper's main metric, for saved checkpoints.

    python evaluate.py out/real/entrodrop --data out/real/data/math/test.jsonl --format embedded
    python evaluate.py checkpoints/SmolLM2-135M-Instruct --data gsm8k_test.jsonl --format gsm8k \\
        --shots 8
    torchrun --nproc_per_node=8 evaluate.py out/q06/entrodrop --data gsm8k_test.jsonl --format gsm8k

PATH is a Hugging Face folder with tokenizer files, or a run folder of train.py, whose exports
(best/ and epochs/<epoch>/) are each scored. Beside each checkpoint goes scores.json, with an
entry per set (named by --set_name, by default the data file's stem, so that several domains can
be averaged as the paper does): the accuracy with a 95% Wilson interval and, for every problem,
the exact prompt, the generation, the extracted and the reference answer, so that any prompt can
be re-run elsewhere. It is rewritten after every few batches, and a rerun continues where it
stopped.

Formats (one JSON object per line):
    embedded  question, answer (a number)          the problems of data/embedded.py
    gsm8k     question, answer ending "#### N"     GSM8K
    math      problem, solution with \\boxed{...}  MATH, MATH500 (an "answer" field wins if present)
Prompts are "Question: ...\\nAnswer:" (math: "Problem: ...\\nSolution:"), after --shots worked
examples: the 8 chain-of-thought exemplars usual for GSM8K, or the 4 usual for MATH (Minerva),
written out below. Decoding is greedy and stops at the next question or an end token.

Answer rules, as is usual for each set:
- embedded, gsm8k: the number after the last "The answer is" or "####", else the generation's
  last number; commas, "$" and units dropped; compared as numbers ("3.50" is "3.5").
- math: the last \\boxed{...} of the generation, else what follows "The final answer is";
  both sides normalized (no spaces, $, \\left/\\right, \\!, degrees, %, trailing \\text units
  or "x ="; \\dfrac and \\tfrac are \\frac; \\frac12 is \\frac{1}{2}), then compared as
  numbers when both are one (0.5 is \\frac{1}{2} is 1/2), else as strings.
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from entropy import checkpoint_fingerprint
from model import Transformer, replace_durably
from tokenizer import load_tokenizer

FORMATS = ("embedded", "gsm8k", "math")
STOP_STRINGS = ("\nQuestion:", "\nProblem:", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>",
                "<|eot_id|>")

# The eight worked examples usual in chain-of-thought prompting for GSM8K (Wei et al., 2022).
EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After "
     "they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So "
     "there must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the "
     "parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have "
     "left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
     "After eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
     "lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
     "20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys "
     "does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more "
     "toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, "
     "from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
     "So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. "
     "How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After "
     "losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
     "So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
]


# The four worked examples that MATH is usually prompted with (Lewkowycz et al., 2022, Minerva).
MATH_EXEMPLARS = [
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so "
     "$x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, "
     "so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is "
     "$\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find "
     "$\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = "
     "(2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights "
     "instead, how many times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ "
     "pounds of weight. If he lifts two 15-pound weights instead for $n$ times, he will lift a "
     "total of $2\\cdot15\\cdot n=30n$ pounds of weight. Equating this to 480 pounds, we can solve "
     "for $n$:\n\\begin{align*}\n30n&=480\\\\\n"
     "\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\n"
     "Final Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a "
     "solution $(x, y)$ where $x$ and $y$ are both nonzero, find $\\frac{a}{b},$ assuming $b$ is "
     "nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n"
     "$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n"
     "$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
     "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
]


# ---- problems, prompts and answers ----------------------------------------------------------

def read_problems(path, fmt) -> list[dict]:
    """[{"question", "reference"}] from a JSONL file of the given format; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"problem file {path} does not exist")
    question_key, answer_key = ("problem", "solution") if fmt == "math" else ("question", "answer")
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e.msg}); "
                             "fix or drop that line") from None
        if not isinstance(record, dict) or not isinstance(record.get(question_key), str) or \
                (answer_key not in record and "answer" not in record):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: format {fmt!r} needs a string {question_key!r} and "
                             f"{answer_key!r} (found {found})")
        problems.append({"question": record[question_key],
                         "reference": reference_answer(record, fmt, where)})
    if not problems:
        raise ValueError(f"problem file {path} holds no problems")
    return problems


def reference_answer(record, fmt, where) -> str:
    if fmt == "math":
        answer = record.get("answer") or last_boxed(str(record["solution"]))
        if answer is None:
            raise ValueError(f"{where}: the solution has no \\boxed{{...}} answer, "
                             "and there is no 'answer' field")
        return str(answer)
    answer = str(record["answer"])
    if fmt == "gsm8k":
        if "####" not in answer:
            raise ValueError(f"{where}: a GSM8K answer ends with '#### N', and this one does not")
        answer = answer.rsplit("####", 1)[1]
    reference = normalize_number(answer)
    if reference is None:
        raise ValueError(f"{where}: the answer {record['answer']!r} is not a number")
    return reference


def build_prompt(question, fmt, shots) -> str:
    if fmt == "math":
        examples = "".join(f"Problem: {q}\nSolution: {a}\n\n" for q, a in MATH_EXEMPLARS[:shots])
        return f"{examples}Problem: {question}\nSolution:"
    examples = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in EXEMPLARS[:shots])
    return f"{examples}Question: {question}\nAnswer:"


def normalize_number(text) -> str | None:
    """The first number in text, canonical: "1,250.50" -> "1250.5", "$7." -> "7"; None if there
    is none."""
    match = re.search(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)", text)
    if match is None:
        return None
    return format(Decimal(match.group().replace(",", "")).normalize(), "f")


def extract_answer(generation, fmt) -> str | None:
    """embedded, gsm8k: the number after the last "The answer is" or "####", else the last number.
    math: the last \\boxed{...}, else what follows "The final answer is"."""
    if fmt == "math":
        boxed = last_boxed(generation)
        if boxed is not None:
            return boxed
        final = re.findall(r"[Tt]he final answer is\s*\$?(.+?)\$?\s*(?:\.\s|\.?$|\n)", generation)
        return final[-1].strip() if final else None
    marked = re.findall(r"(?:[Tt]he answer is|####)\s*:?\s*\$?\s*(-?[\d,]*\.?\d+)", generation)
    if marked:
        return normalize_number(marked[-1])
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", generation)
    return normalize_number(numbers[-1]) if numbers else None


def last_boxed(text) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    depth, begin = 0, text.index("{", start)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin + 1:i]
    return None  # never closed: a generation cut short


def normalize_math(answer) -> str:
    """A MATH answer in one canonical spelling (the rules in the module's docstring)."""
    text = answer.strip().replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    text = re.sub(r"\\(?:d|t)frac", r"\\frac", text)
    for gone in ("\\left", "\\right", "^{\\circ}", "^\\circ", "\\$", "$", "\\%", "%"):
        text = text.replace(gone, "")
    # A trailing unit: "10\\text{ cm}".
    text = re.sub(r"^(.*\S)\s*\\(?:text|mbox)\{\s*[a-zA-Z ]+\}$", r"\1", text.strip())
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    if re.fullmatch(r"[a-zA-Z]\s*=.*", text):  # "x = 5" -> "5"
        text = text.split("=", 1)[1]
    text = text.replace(" ", "").rstrip(".")
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)   # \\frac12
    text = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", text)
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)          # \\sqrt3
    text = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", text)           # 1,000
    return re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", text)        # .5 -> 0.5


def as_fraction(text) -> Fraction | None:
    """A normalized answer as an exact number, if it is one: "-3", "0.5", "\\frac{1}{2}", "1/2"."""
    sign, body = (-1, text[1:]) if text.startswith("-") else (1, text)
    match = re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}|(\d+)/(\d+)", body)
    try:
        if match:
            numerator, denominator = (int(g) for g in match.groups() if g is not None)
            return sign * Fraction(numerator, denominator)
        return sign * Fraction(Decimal(body)) if re.fullmatch(r"\d+(?:\.\d+)?", body) else None
    except ZeroDivisionError:
        return None


def is_correct(extracted, reference, fmt) -> bool:
    if extracted is None:
        return False
    if fmt != "math":
        return extracted == reference
    mine, theirs = normalize_math(extracted), normalize_math(reference)
    numbers = as_fraction(mine), as_fraction(theirs)
    return numbers[0] == numbers[1] if None not in numbers else mine == theirs


def cut_at_stop(text) -> str:
    """The generation up to the first stop string."""
    ends = [text.find(stop) for stop in STOP_STRINGS if stop in text]
    return text[:min(ends)] if ends else text


def wilson_interval(correct, n, z=1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: honest at 0 or n successes, unlike
    p +- z sqrt(p(1-p)/n)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ---- batched greedy decoding ---------------------------------------------------------------

@torch.no_grad()
def generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress=True,
                     synchronized=False) -> list[str]:
    """Greedy continuations of prompts, batch_size at a time, each cut at its first stop string.
    Prompts are sorted by length, so a batch pads little, and left-padded within it.
    synchronized: every rank decodes in step until all of them are done (a model sharded with FSDP
    gathers its weights from every rank at each step); each rank then needs as many prompts."""
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    answers = [""] * len(prompts)

    def finished_rows(new_ids):  # (b, t): rows whose text so far holds a stop string
        done = torch.tensor([cut_at_stop(tokenizer.decode(row)) != tokenizer.decode(row)
                             for row in new_ids.tolist()])
        if synchronized:  # rows stop together, when every row of every rank is done
            everyone = done.all().to(device=device, dtype=torch.int)
            dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
            done = torch.full_like(done, bool(everyone))
        return done

    with tqdm(total=len(prompts), desc="generating", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            pad = torch.tensor([width - len(encoded[i]) for i in rows], device=device)
            idx = torch.tensor([[tokenizer.eos_id] * (width - len(encoded[i])) + encoded[i]
                                for i in rows], device=device)
            # Synchronized, a row's end-of-text is only a stop string: no rank may stop on its own.
            out = model.generate(idx, max_new_tokens,
                                 eos_id=None if synchronized else tokenizer.eos_id,
                                 pad_lengths=pad, finished_rows=finished_rows)
            for i, row in zip(rows, out[:, width:].tolist()):
                answers[i] = cut_at_stop(tokenizer.decode(row))
            bar.update(len(rows))
    return answers


def score(model, tokenizer, problems, fmt, shots, max_new_tokens, batch_size, progress=True,
          synchronized=False) -> list[dict]:
    """One record per problem: prompt, generation, extracted and reference answers, correct."""
    prompts = [build_prompt(p["question"], fmt, shots) for p in problems]
    generations = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress,
                                   synchronized)
    records = []
    for problem, prompt, generation in zip(problems, prompts, generations):
        extracted = extract_answer(generation, fmt)
        records.append({"prompt": prompt, "generation": generation, "extracted": extracted,
                        "reference": problem["reference"],
                        "correct": is_correct(extracted, problem["reference"], fmt)})
    return records


# ---- checkpoints and scores.json ------------------------------------------------------------

def is_checkpoint(folder) -> bool:
    """A Hugging Face folder: config.json and weights (a run folder has a config.json of its
    own)."""
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def checkpoints_under(path) -> list[Path]:
    """A HF folder itself, or a run folder's exports: best/, then epochs/<epoch>/ in epoch order."""
    path = Path(path)
    if is_checkpoint(path):
        return [path]
    epochs = sorted((p for p in (path / "epochs").glob("*") if is_checkpoint(p)),
                    key=lambda p: float(p.name))
    found = ([path / "best"] if is_checkpoint(path / "best") else []) + epochs
    if not found:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (config.json) nor a run "
                                "folder with best/ or epochs/<epoch>/ exports")
    return found


def write_json(path, obj):
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(obj, indent=1) + "\n")
    replace_durably(temporary, path)


def evaluate_checkpoint(folder, problems, set_name, settings, batch_size, rank=0,
                        world_size=1) -> dict:
    """Score one checkpoint on one set, continuing from its entry in scores.json when that has the
    same settings and was computed from the same weights (best/ is rewritten while a run trains).
    scores.json holds one entry per set, so that a checkpoint can be scored on several domains."""
    settings = {**settings, "checkpoint": checkpoint_fingerprint(folder)}
    path = folder / "scores.json"
    every_set = json.loads(path.read_text()) if path.is_file() else {}
    earlier = every_set.get(set_name, {})
    done = earlier.get("problems", []) if earlier.get("settings") == settings else []
    if len(done) < len(problems):
        tokenizer = load_tokenizer(str(folder))
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                              if torch.cuda.is_available() else "cpu")
        model = Transformer.from_pretrained(folder, device=device).eval()
        chunk = 4 * batch_size * world_size  # scores.json is rewritten after each chunk
        for start in range(len(done), len(problems), chunk):
            part = problems[start:start + chunk]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                mine = score(model, tokenizer, part[rank::world_size], settings["format"],
                             settings["shots"], settings["max_new_tokens"], batch_size,
                             progress=rank == 0)
            if world_size > 1:  # problem j of the chunk was scored by rank j % world_size
                gathered = [None] * world_size
                dist.all_gather_object(gathered, mine)
                mine = [gathered[j % world_size][j // world_size] for j in range(len(part))]
            done += mine
            if rank == 0:
                every_set[set_name] = summary(done, settings, partial=len(done) < len(problems))
                write_json(path, every_set)
    every_set[set_name] = summary(done, settings, partial=False)
    if rank == 0:
        write_json(path, every_set)
    return every_set[set_name]


def summary(records, settings, partial) -> dict:
    correct = sum(r["correct"] for r in records)
    low, high = wilson_interval(correct, len(records))
    return {"settings": settings, "partial": partial, "n": len(records), "correct": correct,
            "accuracy": correct / max(1, len(records)), "interval95": [low, high],
            "problems": records}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path",
                        help="a Hugging Face checkpoint folder, or a run folder of train.py")
    parser.add_argument("--data", required=True, help="a JSONL file of problems")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--shots", type=int, default=0,
                        help=f"worked examples before each question (0-{len(EXEMPLARS)}; "
                             f"math: 0-{len(MATH_EXEMPLARS)})")
    parser.add_argument("--set_name", default="",
                        help="the set's name in scores.json (default: the data file's stem)")
    parser.add_argument("--limit", type=int, default=0,
                        help="score only the first N problems (0: all)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16, help="prompts decoded together")
    args = parser.parse_args(argv)
    most = len(MATH_EXEMPLARS if args.format == "math" else EXEMPLARS)
    if not 0 <= args.shots <= most:
        parser.error(f"--shots={args.shots} must be between 0 and {most} "
                     f"for --format {args.format}")
    for name in ("limit", "max_new_tokens", "batch_size"):
        if getattr(args, name) < (0 if name == "limit" else 1):
            parser.error(f"--{name}={getattr(args, name)} must be "
                         f"{'>= 0' if name == 'limit' else '>= 1'}")
    problems = read_problems(args.data, args.format)[:args.limit or None]
    folders = checkpoints_under(args.path)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    digest = hashlib.sha256(Path(args.data).read_bytes()).hexdigest()
    settings = {"data_sha256": digest, "format": args.format, "shots": args.shots,
                "limit": args.limit, "max_new_tokens": args.max_new_tokens}
    for folder in folders:
        result = evaluate_checkpoint(folder, problems, args.set_name or Path(args.data).stem,
                                     settings, args.batch_size, rank, world_size)
        if rank == 0:
            low, high = result["interval95"]
            print(f"{folder}: accuracy {result['accuracy']:.1%} "
                  f"({result['correct']}/{result['n']}, 95% interval {low:.1%}-{high:.1%})")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
