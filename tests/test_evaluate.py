"""evaluate.py: batched greedy decoding against transformers' generate, the answer rules on real
answer strings, scores.json, resuming, and errors."""

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

import evaluate
from data.embedded import generate_problems
from model import Transformer
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def transformers_answers(folder, tokenizer, prompts, max_new_tokens):
    """Greedy continuations from transformers' generate, one prompt at a time (no padding at
    all)."""
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        idx = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = reference.generate(idx, attention_mask=torch.ones_like(idx),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
        answers.append(evaluate.cut_at_stop(tokenizer.decode(out[0, idx.shape[1]:].tolist())))
    return answers


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen3")
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=257, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16, max_position_embeddings=512)).save_pretrained(folder)
    load_tokenizer("byte").save(str(folder))
    return folder


def test_batched_greedy_answers_equal_transformers_generate(smollm2, tiny_qwen3):
    questions = [p.question for p in generate_problems(5, seed=11)]
    for folder, shots, max_new_tokens in ((smollm2, 1, 40), (tiny_qwen3, 0, 24)):
        tokenizer = load_tokenizer(str(folder))
        prompts = [evaluate.build_prompt(q, "embedded", shots) for q in questions]
        model = Transformer.from_pretrained(folder).eval()
        ours = evaluate.generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size=5,
                                         progress=False)
        assert len({len(tokenizer.encode(p)) for p in prompts}) > 1  # the batch really is padded
        assert ours == transformers_answers(folder, tokenizer, prompts, max_new_tokens), folder.name


def test_answer_rules_on_real_answer_strings():
    extract = lambda text: evaluate.extract_answer(text, "gsm8k")  # noqa: E731
    # GSM8K's own solutions (train set, first lines) and the shapes models write.
    assert extract("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                   "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
                   "#### 72") == "72"
    assert extract("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10") == "10"
    assert extract(" 3 + 4 = 7 apples.\nThe answer is 1,250.") == "1250"
    assert extract(" The answer is: $18.00.") == "18"
    assert extract(" She has 5 - 8 = -3 left") == "-3"
    assert extract(" 2 * 3.50 = 7.0 dollars") == "7"
    assert extract(" no number here") is None
    assert [evaluate.normalize_number(t)
            for t in ("$1,234.50", "0.50", ".5", "007", "12 apples", "none")] == \
        ["1234.5", "0.5", "0.5", "7", "12", None]
    assert evaluate.cut_at_stop(" 7.\nThe answer is 7.\nQuestion: next one") == \
        " 7.\nThe answer is 7."
    assert evaluate.cut_at_stop(" 8<|im_end|>\n<|im_start|>") == " 8"


def test_wilson_interval():
    low, high = evaluate.wilson_interval(5, 10)
    assert abs(low - 0.2366) < 1e-4 and abs(high - 0.7634) < 1e-4
    low, high = evaluate.wilson_interval(0, 10)
    assert low == 0.0 and abs(high - 0.2775) < 1e-4


def test_prompts_with_shots():
    prompt = evaluate.build_prompt("What is 2 + 2?", "gsm8k", 2)
    assert prompt.startswith("Question: There are 15 trees")
    assert prompt.endswith("Question: What is 2 + 2?\nAnswer:")
    assert prompt.count("The answer is") == 2 and prompt.count("Question:") == 3
    math = evaluate.build_prompt("Compute $1+1$.", "math", 4)
    assert math.count("\\boxed{") == 4 and math.endswith("Problem: Compute $1+1$.\nSolution:")


def test_math_answer_rules_on_real_answers():
    """MATH test answers and the spellings models give for them."""
    same = [("\\frac{14}{3}", "\\dfrac{14}{3}"), ("\\frac{1}{2}", "0.5"), ("\\frac12", "1/2"),
            ("10", "10\\text{ inches}"), ("90", "90^\\circ"), ("18.90", "\\$18.90"),
            ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("3", "x = 3"),
            ("[2,5)", "[2, 5)"), ("1000", "1,000"), ("2\\sqrt{5}", "2 \\sqrt5"), ("25\\%", "25"),
            ("\\text{Evelyn}", "Evelyn"), ("-\\frac{2}{3}", "-\\frac{2}{3}.")]
    for reference, answer in same:
        assert evaluate.is_correct(answer, reference, "math"), (answer, reference)
    for reference, answer in (("\\frac{14}{3}", "\\frac{3}{14}"),
                              ("(3,\\frac{\\pi}{2})", "(3,\\frac{\\pi}{4})"), ("5", "-5")):
        assert not evaluate.is_correct(answer, reference, "math"), (answer, reference)
    generation = ("We get $\\boxed{\\frac{a}{b}}$ first, then\n"
                  "$$\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final")
    assert evaluate.extract_answer(generation, "math") == "-\\frac{2}{3}"
    assert evaluate.extract_answer("Final Answer: The final answer is $24$. I hope it is correct.",
                                   "math") == "24"
    assert evaluate.extract_answer("so it is \\boxed{\\frac{1}{2", "math") is None  # cut short


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_problem_files(tmp_path):
    cases = [("not json", "{\"question\": ", "line 1 is not valid JSON", "embedded"),
             ("missing", json.dumps({"problem": "x", "answer": 1}),
              "line 1: format 'embedded' needs a string 'question' and 'answer' "
              "\\(found \\['answer', 'problem'\\]\\)", "embedded"),
             ("no hashes", json.dumps({"question": "x", "answer": "it is 4"}),
              "line 1: a GSM8K answer ends with", "gsm8k"),
             ("not a number", json.dumps({"question": "x", "answer": "four"}),
              "line 1: the answer 'four' is not a number", "embedded")]
    for name, line, match, fmt in cases:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(ValueError, match=match):
            evaluate.read_problems(path, fmt)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl does not exist"):
        evaluate.read_problems(tmp_path / "nowhere.jsonl", "embedded")


def test_scores_json_holds_every_problem_and_a_crash_keeps_what_was_scored(tiny_qwen3, tmp_path,
                                                                           monkeypatch):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for item in tiny_qwen3.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    data = write_jsonl(tmp_path / "test.jsonl", [{"question": p.question, "answer": p.answer}
                                                  for p in generate_problems(10, seed=5)])
    args = [str(folder), "--data", str(data), "--format", "embedded", "--max_new_tokens", "8",
            "--batch_size", "2"]
    real_score, calls = evaluate.score, []

    def crash_on_second_chunk(model, tokenizer, problems, *rest, **kw):
        calls.append(len(problems))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(model, tokenizer, problems, *rest, **kw)

    monkeypatch.setattr(evaluate, "score", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(args)
    # The set is named after its file.
    partial = json.loads((folder / "scores.json").read_text())["test"]
    assert partial["partial"] and partial["n"] == 8  # the first chunk of 4 x batch_size
    monkeypatch.setattr(evaluate, "score", real_score)
    evaluate.main(args)
    scores = json.loads((folder / "scores.json").read_text())["test"]
    assert not scores["partial"] and scores["n"] == 10
    assert scores["problems"][:8] == partial["problems"]
    record = scores["problems"][0]
    assert set(record) == {"prompt", "generation", "extracted", "reference", "correct"}
    assert record["prompt"].endswith("\nAnswer:")
    assert record["reference"] == str(generate_problems(1, seed=5)[0].answer)
    assert scores["accuracy"] == sum(r["correct"] for r in scores["problems"]) / 10


def test_a_run_folder_means_its_exports(tiny_qwen3, tmp_path):
    run = tmp_path / "run"
    for export in ("best", "epochs/10", "epochs/2"):
        (run / export).mkdir(parents=True)
        for item in tiny_qwen3.iterdir():
            (run / export / item.name).write_bytes(item.read_bytes())
    # train.py's settings, not a model
    (run / "config.json").write_text(json.dumps({"method": "entrodrop"}))
    assert evaluate.checkpoints_under(run) == [run / "best", run / "epochs" / "2",
                                               run / "epochs" / "10"]
    assert evaluate.checkpoints_under(run / "best") == [run / "best"]


def test_checkpoint_without_tokenizer_files_and_the_command_line(tiny_qwen3, tmp_path):
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_qwen3 / name).read_bytes())
    data = write_jsonl(tmp_path / "test.jsonl", [{"question": "2 + 2?", "answer": 4}])
    result = subprocess.run([sys.executable, "evaluate.py", str(folder), "--data", str(data),
                             "--format", "embedded"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: {folder} holds no tokenizer")
    result = subprocess.run([sys.executable, "evaluate.py", str(tmp_path), "--data", str(data),
                             "--format", "embedded"], cwd=ROOT, capture_output=True, text=True)
    assert "is neither a checkpoint folder" in result.stderr


def test_two_ranks_under_torchrun_write_the_scores_of_one_process(smollm2, tmp_path):
    """Each rank scores every other problem of a chunk and rank 0 writes them back in order: 9
    problems in chunks of 8 (4 x batch_size x 2 ranks) leave rank 1 none in the last chunk."""
    problems = [{"question": p.question, "answer": p.answer} for p in generate_problems(9, seed=7)]
    model, tokenizer = Transformer.from_pretrained(smollm2).eval(), load_tokenizer(str(smollm2))
    first = evaluate.score(model, tokenizer,
                           [{"question": p["question"], "reference": str(p["answer"])}
                            for p in problems], "embedded", 1, 16, 9, progress=False)
    for problem, record in list(zip(problems, first))[1::2]:  # right and wrong answers to compare
        problem["answer"] = record["extracted"] or problem["answer"]
    data = write_jsonl(tmp_path / "test.jsonl", problems)
    scores = {}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2"])):
        folder = tmp_path / name  # the weights linked, each with a scores.json of its own
        folder.mkdir()
        for item in smollm2.iterdir():
            (folder / item.name).symlink_to(item)
        # A batch of one: no padding, so the same problem decodes alike on either rank.
        result = subprocess.run([*launcher, "evaluate.py", str(folder), "--data", str(data),
                                 "--format", "embedded", "--shots", "1", "--max_new_tokens", "16",
                                 "--batch_size", "1"], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        scores[name] = json.loads((folder / "scores.json").read_text())["test"]
    assert scores["two"] == scores["one"]
    assert [r["prompt"] for r in scores["one"]["problems"]] == \
        [evaluate.build_prompt(p["question"], "embedded", 1) for p in problems]
    assert 0 < scores["one"]["correct"] < 9


def test_lm_eval_agrees_with_evaluate_py_on_the_local_task(smollm2, tmp_path, monkeypatch):
    """lm-eval's hf model on the shipped task eval/embedded.yaml, and evaluate.py, on the same
    problems: the same generations word for word, and the same accuracy."""
    model, tokenizer = Transformer.from_pretrained(smollm2).eval(), load_tokenizer(str(smollm2))
    problems = generate_problems(8, seed=21)
    first = evaluate.score(model, tokenizer,
                           [{"question": p.question, "reference": str(p.answer)} for p in problems],
                           "embedded", 0, 128, 8, progress=False)
    # The base model rarely solves these: its own answer becomes the reference of every other
    # problem, so that both scorers have right and wrong answers to agree on.
    answers = [r["extracted"] if i % 2 and r["extracted"] else p.answer
               for i, (p, r) in enumerate(zip(problems, first))]
    # Where the task file looks, from here.
    data = tmp_path / "out" / "real" / "data" / "math" / "test.jsonl"
    data.parent.mkdir(parents=True)
    write_jsonl(data, [{"question": p.question, "answer": a} for p, a in zip(problems, answers)])
    ours = evaluate.score(model, tokenizer, evaluate.read_problems(data, "embedded"), "embedded", 0,
                          128, 8, progress=False)
    assert 0 < sum(r["correct"] for r in ours) < len(ours)
    monkeypatch.chdir(tmp_path)
    samples, accuracy = run_lm_eval(smollm2, "embedded_problems", batch_size=8)
    assert [sample["resps"][0][0] for sample in samples] == [r["generation"] for r in ours]
    assert accuracy == sum(r["correct"] for r in ours) / len(ours)


def run_lm_eval(folder, task, **settings):
    """lm-eval's hf model on one task of eval/, from the current directory: its samples in problem
    order, and its accuracy."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    tasks = TaskManager(include_path=str(ROOT / "eval"), include_defaults=False)
    results = simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                              tasks=[task], task_manager=tasks, device="cpu", log_samples=True,
                              **settings)
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return samples, results["results"][task]["exact_match,evaluate.py"]


def test_the_gsm8k_format_task_builds_evaluate_py_prompts_and_references(monkeypatch):
    """eval/gsm8k_local.yaml read by lm-eval, without a model: for every number of worked examples
    the prompt of evaluate.py --format gsm8k --shots K, and its references normalized alike."""
    from lm_eval.tasks import TaskManager
    monkeypatch.chdir(ROOT)  # where the task looks for its problems
    task = TaskManager(include_path=str(ROOT / "eval"),
                       include_defaults=False).load("gsm8k_local")["tasks"]["gsm8k_local"]
    docs = list(task.test_docs())
    problems = evaluate.read_problems(ROOT / "eval" / "gsm8k_local.jsonl", "gsm8k")
    for shots in range(len(evaluate.EXEMPLARS) + 1):
        assert [task.fewshot_context(doc, shots) for doc in docs] == \
            [evaluate.build_prompt(p["question"], "gsm8k", shots) for p in problems], shots
    assert [task.doc_to_target(doc) for doc in docs] == [p["reference"] for p in problems]
    assert task.config.generation_kwargs["until"] == list(evaluate.STOP_STRINGS)
    assert task.config.generation_kwargs["do_sample"] is False
    assert {"1250", "3.5", "9"} <= {p["reference"] for p in problems}  # "1,250", "3.50", "9.00"


def test_lm_eval_agrees_with_evaluate_py_on_the_gsm8k_format_task(smollm2, tmp_path,
                                                                   monkeypatch):
    """eval/gsm8k_local.yaml with a worked example, and evaluate.py --format gsm8k --shots 1, on
    8 of its problems: the same prompts and generations, the same extracted answers, the same
    normalized references and the same accuracy."""
    shipped = ROOT / "eval" / "gsm8k_local.jsonl"
    problems = [json.loads(line) for line in shipped.open()][:8]
    model, tokenizer = Transformer.from_pretrained(smollm2).eval(), load_tokenizer(str(smollm2))
    first = evaluate.score(model, tokenizer, evaluate.read_problems(shipped, "gsm8k")[:8], "gsm8k",
                           1, 32, 8, progress=False)
    # As in the embedded test, every other reference becomes the model's own answer, here spelled
    # with a thousands separator and trailing zeros ("1,250.00"), which the raw text would not
    # match.
    for i, (problem, record) in enumerate(zip(problems, first)):
        if i % 2 and record["extracted"]:
            solution = problem["answer"].rsplit("####", 1)[0]
            problem["answer"] = f"{solution}#### {Decimal(record['extracted']):,.2f}"
    (tmp_path / "eval").mkdir()  # where the task looks, from tmp_path
    data = write_jsonl(tmp_path / "eval" / "gsm8k_local.jsonl", problems)
    ours = [{**record, "reference": problem["reference"],
             "correct": evaluate.is_correct(record["extracted"], problem["reference"], "gsm8k")}
            for record, problem in zip(first, evaluate.read_problems(data, "gsm8k"))]
    assert 0 < sum(r["correct"] for r in ours) < len(ours)
    monkeypatch.chdir(tmp_path)
    samples, accuracy = run_lm_eval(smollm2, "gsm8k_local", batch_size=8, num_fewshot=1,
                                    gen_kwargs={"max_gen_toks": 32})
    assert [sample["arguments"][0][0] for sample in samples] == [r["prompt"] for r in ours]
    assert [sample["resps"][0][0] for sample in samples] == [r["generation"] for r in ours]
    assert [sample["filtered_resps"][0][0] for sample in samples] == \
        [r["extracted"] or "" for r in ours]
    assert [sample["target"] for sample in samples] == [r["reference"] for r in ours]
    assert accuracy == sum(r["correct"] for r in ours) / len(ours)
