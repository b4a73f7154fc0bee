"""
Tokenize a local JSONL file into the on-disk format: DIR/train.bin, DIR/val.bin, DIR/meta.json.

    python data/prepare.py --input gsm8k.jsonl --format gsm8k --tokenizer /ckpt/Qwen3-0.6B \\
        --out data/gsm8k

Formats (one JSON object per line) and the document each record becomes:
    gsm8k     question, answer                         "Question: ...\\nAnswer: ..."
    numina    problem, solution (or chat `messages`)   "Problem: ...\\nSolution: ..."
    code      question/problem/prompt, then response/solution/answer/code
    instruct  `conversations` [{from, value}] or `messages` [{role, content}]
              "User: ...\\n\\nAssistant: ..."
    text      text
Anything else: --template "Title: {title}\\n{body}" names the fields directly.

The tokenizer is any that tokenizer.py loads: the model's checkpoint folder (Qwen3, Qwen2.5,
Llama 3), a tokenizer.model file, or "byte". Documents go to val with probability --val_share,
decided by --seed, so the split is reproducible.
"""

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from data.loader import DatasetWriter, load_meta  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

ROLES = {"human": "User", "user": "User", "gpt": "Assistant", "assistant": "Assistant",
         "system": "System"}


def field(record, names, where, fmt):
    """The first of `names` that the record has, as text (a number is written out as one)."""
    for name in names:
        value = record.get(name)
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if name in record:
            raise ValueError(f"{where}: field {name!r} is a {type(value).__name__}, but format "
                             f"{fmt!r} reads text or a number from it; give --template to say how "
                             "to write the record out")
    raise ValueError(f"{where}: the record has none of the fields {list(names)} that format "
                     f"{fmt!r} reads (it has {sorted(record)}); pick another --format or give "
                     "--template")


def render_chat(turns, where):
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"{where}: expected a list of chat turns "
                         f"({{from, value}} or {{role, content}})")
    lines = []
    for turn in turns:
        role = turn.get("from", turn.get("role", ""))
        lines.append(f"{ROLES.get(role, role.capitalize())}: "
                     f"{turn.get('value', turn.get('content', ''))}")
    return "\n\n".join(lines)


def render(record, fmt, template, where) -> str:
    """One JSONL record -> the text of one document."""
    if template is not None:
        try:
            return template.format_map(record)
        except (KeyError, IndexError, AttributeError, TypeError) as e:
            # {a}, {a[3]}, {a.b}, {a[b]}: a field, item or attribute that is not there
            raise ValueError(f"{where}: --template names a field the record does not have "
                             f"({type(e).__name__}: {e}); the record's fields are "
                             f"{sorted(record)}") from None
    if fmt == "gsm8k":
        return (f"Question: {field(record, ['question'], where, fmt)}\n"
                f"Answer: {field(record, ['answer'], where, fmt)}")
    if fmt == "numina":
        if "problem" not in record and "messages" in record:
            return render_chat(record["messages"], where)
        return (f"Problem: {field(record, ['problem'], where, fmt)}\n"
                f"Solution: {field(record, ['solution'], where, fmt)}")
    if fmt == "code":
        question = field(record, ["question", "problem", "prompt"], where, fmt)
        return (f"Question: {question}\n"
                f"Answer: {field(record, ['response', 'solution', 'answer', 'code'], where, fmt)}")
    if fmt == "instruct":
        turns = record.get("conversations", record.get("messages"))
        if turns is None:
            raise ValueError(f"{where}: format 'instruct' reads `conversations` or `messages`, "
                             f"and the record has neither (it has {sorted(record)})")
        return render_chat(turns, where)
    return field(record, ["text"], where, fmt)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a JSONL file")
    parser.add_argument("--format", choices=["gsm8k", "numina", "code", "instruct", "text"])
    parser.add_argument("--template",
                        help="a str.format template over the record's fields, instead of --format")
    parser.add_argument("--tokenizer", required=True,
                        help="checkpoint folder, tokenizer file, or 'byte'")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--val_share", type=float, default=0.02,
                        help="share of documents held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val assignment")
    args = parser.parse_args(argv)
    if (args.format is None) == (args.template is None):
        parser.error("give exactly one of --format and --template")
    if not 0.0 <= args.val_share < 1.0:
        parser.error(f"--val_share={args.val_share} must be in [0, 1)")
    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"--input {path} is empty")

    tokenizer = load_tokenizer(args.tokenizer)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    source = {"input": str(path.resolve()), "sha256": digest, "format": args.format,
              "template": args.template, "val_share": args.val_share, "seed": args.seed}
    split_rng = random.Random(args.seed)
    documents = 0
    # Read as bytes and decoded line by line, so that bad UTF-8 is reported with its line number.
    with DatasetWriter(args.out, tokenizer, source) as writer, open(path, "rb") as lines:
        for line_no, raw in enumerate(tqdm(lines, desc=f"tokenizing {path.name}", unit=" docs"),
                                      start=1):
            where = f"{path}, line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where} is not valid UTF-8 ({e.reason} at byte {e.start} of the "
                                 "line); re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e.msg}); "
                                 "fix or drop that line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where} is a JSON {type(record).__name__}, "
                                 "not an object with fields")
            text = render(record, args.format, args.template, where)
            writer.add("val" if split_rng.random() < args.val_share else "train",
                       tokenizer.encode(text))
            documents += 1
        if documents == 0:  # raised inside the writer, so no empty dataset is left behind
            raise ValueError(f"--input {path} holds only blank lines, no records")
    meta = load_meta(args.out)
    for split, counts in meta["splits"].items():
        print(f"{args.out}/{split}.bin: {counts['documents']:,} documents, "
              f"{counts['tokens']:,} tokens")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
