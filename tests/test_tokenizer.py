"""tokenizer.py against Hugging Face `tokenizers` and a directly built tiktoken Encoding.

A byte-level BPE is trained here on a small varied corpus, then written in each supported
layout; every layout must encode hundreds of varied strings exactly like the reference."""

import base64
import json
import os
import random
import re
import unicodedata

import numpy as np
import pytest
import tiktoken
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from data.embedded import format_problem, generate_problems, stdlib_documents
from tokenizer import load_tokenizer

# Written out here rather than imported, so a typo in tokenizer.py cannot hide.
QWEN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's a sunny day; we'll go outside, "
    "and they've said they'd come too. I'm sure you're right, aren't you?",
    "Language models predict the next token from the previous ones. Entropy measures how "
    "uncertain that prediction is, and dropping easy tokens saves compute during training.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "for i in range(10):\n\tprint(f\"{i}: {fibonacci(i)}\")  # tabs and spaces\n",
    "class Model(nn.Module):\r\n    def forward(self, x):\r\n        return self.proj(x) ** 2\r\n",
    "0123456789 3.14159 2.71828 1,000,000 42 1999-12-31 12:34:56 +1 (555) 010-9999 0x1F 1e-5",
    "你好，世界！今天天气很好。我们一起去公园散步吧。"
    "机器学习和自然语言处理很有意思。",
    "日本語のテキストです。ひらがなとカタカナ、"
    "そして漢字を使います。東京は大きい都市です。",
    "한국어 문장입니다. 서울은 아름다운 도시입니다.",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 "
    "🏳️‍🌈 ❤️ 🇯🇵🇫🇷 🎉🎉🎉",
    "Accents: café naïve résumé Straße Ångström façade "
    "coöperate São Paulo Kraków Zürich",
    "Combining: e\u0301 a\u0308 n\u0303 o\u0302 \u1100\u1161\u11a8 "
    "Ελληνικά Русский текст",
    "Whitespace:    four spaces\t\ttwo tabs\n\n\nthree newlines\r\n\r\n"
    "windows lines   \n  trailing  ",
    "Punctuation!!! Really??? Yes... --- *** ### @@@ $$$ %%% &&& "
    "((( ))) [[[ ]]] {{{ }}} «» “quoted”",
]


def generated_corpus() -> list[str]:
    # Invented words and sentences give the trainer enough distinct pieces for ~1500 merges.
    rng = random.Random(2)
    syllables = ["ka", "ro", "mi", "ten", "sha", "lu", "ver", "qua", "zo", "pin", "dre", "fal",
                 "ché", "ñu"]
    hanzi = sorted({char for line in CORPUS for char in line if "\u4e00" <= char <= "\u9fff"})
    lines = []
    for _ in range(400):
        words = ["".join(rng.choices(syllables, k=rng.randint(1, 4)))
                 for _ in range(rng.randint(3, 12))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ";"]))
        lines.append("".join(rng.choices(hanzi, k=rng.randint(4, 20))) + "。")
        lines.append(f"x_{rng.randint(0, 99)} = {rng.randint(0, 10**6)} * {rng.random():.4f}")
    return lines


def gpt2_byte_table() -> dict[int, str]:
    # An independent formulation of GPT-2's table: visible Latin-1 characters stand for
    # themselves, every other byte takes the next code point from 256 up, in byte order.
    table, shifted = {}, 0
    for byte in range(256):
        if chr(byte).isprintable() and not chr(byte).isspace():
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def varied_strings() -> list[str]:
    fragments = [
        "def f(x):\n\treturn x**2  # square\n", "for (int i = 0; i < n; ++i) {", "    }\r\n",
        "if x != None:\r\n        y = {'a': [1, 2]}", "import torch.nn as nn", "λx. x + 1",
        "1234567890", "3.14159", "2024-06-01", "1,000,000", "٣٤٥", "Ⅻ", "½", "１２３",
        "你好，世界！", "日本語のテキストです。", "한국어 문장입니다",
        "漢字かなカナ", "𠀀𠀁",
        "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈",
        "❤️", "🇯🇵", "🧑🏿‍💻",
        "   ", "\t\t", " \n \n", "\r\n", "\n\n\n", "\u00a0", "\u3000", "\u2003", " \t \r",
        "e\u0301", "A\u030a", "n\u0303o", "\u1100\u1161\u11a8", "\u212b", "\u0041\u0327\u0301",
        "I'm", "don't", "WE'LL", "she'S", "they've", "it'd", "'re", "rock'n'roll",
        "!!!", "...", "?!?!", "---", "«»", "“quoted”", "@#$%^&*()", "<|", "|>", "<|endoftext",
        "naïve café", "Straße", "Ελληνικά", "Русский текст",
        "עברית", "العربية", "हिन्दी", "ไทย",
        "\x00", "\x07", "\x7f", "\u200b", "\ufeff", "\u2028", "\u2029", "\x85", "\x0b\x0c",
        "\x1c\x1d\x1e\x1f", "\u180e",
    ]
    separators = ["", " ", "  ", "\n", "\t", "\r\n", " \n"]
    rng = random.Random(0)
    strings = list(fragments) + ["", " ", "a", "hello world", "Hello World\n"] + CORPUS
    for _ in range(300):
        parts = rng.choices(fragments, k=rng.randint(2, 7))
        strings.append("".join(part + rng.choice(separators) for part in parts))
    for length in (1, 2, 3, 4, 7, 10, 25, 60):
        strings.append("".join(rng.choice("0123456789") for _ in range(length)))
        strings.append("x" + " " * length + "y" + "\n" * length + "z")
    for _ in range(60):
        # Latin, Greek, Cyrillic, kana, CJK, Hangul, emoji, and loose combining marks.
        blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x3040, 0x30FF),
                  (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1F64F), (0x300, 0x36F)]
        length = rng.randint(1, 30)
        strings.append("".join(chr(rng.randint(*rng.choice(blocks))) for _ in range(length)))
    assert not any(special in text for text in strings for special in SPECIALS)
    return strings


STRINGS = varied_strings()


def byte_level_split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_tokenizer_json(folder, vocab_size: int, pattern: str = QWEN,
                         nfc: bool = True) -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC() if nfc else None
    hf.pre_tokenizer = byte_level_split(pattern)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    hf.train_from_iterator(CORPUS * 3 + generated_corpus(), trainer=trainer)
    os.makedirs(folder, exist_ok=True)
    hf.save(os.path.join(folder, "tokenizer.json"))
    return HFTokenizer.from_file(os.path.join(folder, "tokenizer.json"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("trained"))
    hf = train_tokenizer_json(folder, vocab_size=1500)
    return folder, hf


@pytest.fixture(scope="module")
def trained_llama3(tmp_path_factory):
    # Trained with Llama 3's own split so that digit triples become tokens and the pattern matters.
    folder = str(tmp_path_factory.mktemp("trained_llama3"))
    hf = train_tokenizer_json(folder, vocab_size=1500, pattern=LLAMA3, nfc=False)
    return folder, hf


def trained_ranks(folder) -> dict[bytes, int]:
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as handle:
        vocab = json.load(handle)["model"]["vocab"]
    char_to_byte = {char: byte for byte, char in gpt2_byte_table().items()}
    return {bytes(char_to_byte[char] for char in token): id_ for token, id_ in vocab.items()}


def test_byte_table_matches_hugging_face():
    table = gpt2_byte_table()
    assert sorted(table.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for byte in [*range(128), 0x80, 0xBF]:  # bytes that a short valid UTF-8 text can show alone
        text = chr(byte) if byte < 128 else bytes([0xC2, byte]).decode()
        assert byte_level.pre_tokenize_str(text)[0][0][-1] == table[byte]


def test_tokenizer_json_matches_hugging_face(trained):
    folder, hf = trained
    ours = load_tokenizer(folder)
    assert hf.get_vocab_size() > 1000  # the corpus really trained a vocabulary, not just bytes
    assert ours.vocab_size == hf.get_vocab_size()
    assert ours.eos_id == hf.token_to_id("<|endoftext|>")
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == hf.encode(text).ids, repr(text)
        assert ours.decode(ids) == unicodedata.normalize("NFC", text), repr(text)
    from_file = load_tokenizer(os.path.join(folder, "tokenizer.json"))
    assert from_file.encode(STRINGS[-1]) == ours.encode(STRINGS[-1])


def test_lone_byte_level_pre_tokenizer_splits_like_gpt2(trained_llama3, tmp_path):
    folder, _ = trained_llama3  # its digit tokens make the split of numbers visible
    hf = HFTokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.save(str(tmp_path / "tokenizer.json"))
    definition = json.loads((tmp_path / "tokenizer.json").read_text())
    assert definition["pre_tokenizer"]["type"] == "ByteLevel"
    ours = load_tokenizer(str(tmp_path))
    for text in STRINGS:
        assert ours.encode(text) == hf.encode(text).ids, repr(text)
    assert ours.fingerprint != load_tokenizer(folder).fingerprint


def test_special_token_text_is_plain_unless_allowed(trained):
    folder, hf = trained
    ours = load_tokenizer(folder)
    text = "end<|endoftext|><|im_start|>"
    plain = ours.encode(text)
    assert ours.eos_id not in plain and len(plain) > 3 and ours.decode(plain) == text
    assert ours.encode("<|endoftext|>", allow_special=True) == [ours.eos_id]
    assert ours.encode(text, allow_special=True) == hf.encode(text).ids
    assert ours.encode(text, allow_special=True)[-2:] == [ours.eos_id,
                                                         hf.token_to_id("<|im_start|>")]
    assert ours.decode(np.array([ours.eos_id])) == "<|endoftext|>"
    assert ours.decode(iter(plain)) == text


def test_vocab_and_merges_layout(trained, tmp_path):
    folder, hf = trained
    hf.model.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["merges.txt", "vocab.json"]
    added = {str(hf.token_to_id(token)): {"content": token, "special": True} for token in SPECIALS}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    ours = load_tokenizer(str(tmp_path))
    reference = load_tokenizer(folder)
    assert ours.eos_id == reference.eos_id and ours.vocab_size == reference.vocab_size
    # This layout always applies NFC, exactly as the tokenizer.json it came from.
    for text in STRINGS:
        assert ours.encode(text) == hf.encode(text).ids, repr(text)
    assert ours.fingerprint == reference.fingerprint
    ours.save(str(tmp_path / "saved"))
    for name in ["merges.txt", "tokenizer_config.json", "vocab.json"]:
        assert (tmp_path / "saved" / name).read_bytes() == (tmp_path / name).read_bytes()
    assert sorted(os.listdir(tmp_path / "saved")) == ["merges.txt", "tokenizer_config.json",
                                                      "vocab.json"]
    assert load_tokenizer(str(tmp_path / "saved")).fingerprint == ours.fingerprint


def test_vocab_and_merges_without_config_puts_endoftext_after_vocab(trained, tmp_path):
    _, hf = trained
    hf.model.save(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    ours = load_tokenizer(str(tmp_path))
    assert ours.eos_id == len(vocab) == ours.vocab_size - 1
    assert ours.encode("<|endoftext|>", allow_special=True) == [len(vocab)]


def write_tiktoken_model(folder, ranks: dict[bytes, int]) -> None:
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")


def test_llama3_tiktoken_model(trained_llama3, tmp_path):
    folder, hf = trained_llama3
    ranks = trained_ranks(folder)
    assert any(token.isdigit() and len(token) == 3 for token in ranks)
    write_tiktoken_model(tmp_path, ranks)
    ours = load_tokenizer(str(tmp_path))
    direct = tiktoken.Encoding("direct", pat_str=LLAMA3, mergeable_ranks=ranks, special_tokens={})
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == direct.encode_ordinary(text) == hf.encode(text).ids, repr(text)
        assert ours.decode(ids) == text  # no normalization in Llama 3
    n = len(ranks)
    assert ours.vocab_size == n + 256
    assert ours.eos_id == n + 1
    assert ours.encode("<|begin_of_text|>", allow_special=True) == [n]
    assert ours.encode("<|eot_id|>", allow_special=True) == [n + 9]
    assert ours.encode("<|python_tag|>", allow_special=True) == [n + 10]
    assert ours.encode("<|reserved_special_token_3|>", allow_special=True) == [n + 11]
    assert ours.encode("<|reserved_special_token_247|>", allow_special=True) == [n + 255]
    assert ours.decode([n + 4]) == "<|finetune_right_pad_id|>"
    assert load_tokenizer(str(tmp_path / "tokenizer.model")).fingerprint == ours.fingerprint
    ours.save(str(tmp_path / "saved"))
    assert os.listdir(tmp_path / "saved") == ["tokenizer.model"]
    assert load_tokenizer(str(tmp_path / "saved")).fingerprint == ours.fingerprint


def test_llama3_config_names_win(trained_llama3, tmp_path):
    folder, _ = trained_llama3
    ranks = trained_ranks(folder)
    write_tiktoken_model(tmp_path, ranks)
    n = len(ranks)
    renamed = {str(n + 11): {"content": "<|image|>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": renamed}))
    ours = load_tokenizer(str(tmp_path))
    assert ours.encode("<|image|>", allow_special=True) == [n + 11]
    assert ours.decode([n + 11]) == "<|image|>"
    assert ours.eos_id == n + 1


def test_byte_tokenizer(tmp_path):
    ours = load_tokenizer("byte")
    assert (ours.name, ours.eos_id, ours.vocab_size) == ("byte", 256, 257)
    assert ours.encode("Aé") == [65, 0xC3, 0xA9]
    assert ours.encode("<|endoftext|>", allow_special=True) == [256]
    assert ours.encode("<|endoftext|>") == list(b"<|endoftext|>")
    rng = random.Random(1)
    arbitrary = ["".join(chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                         for _ in range(rng.randint(1, 40))) for _ in range(100)]
    for text in STRINGS + arbitrary:
        ids = ours.encode(text)
        assert ids == list(text.encode("utf-8")) and all(id_ < 257 for id_ in ids)
        assert ours.decode(ids) == text  # no normalization: any text comes back unchanged
    assert ours.decode([0x41, 0xC3, 0x42]) == "A\ufffdB"  # a cut UTF-8 sequence decodes, replaced

    ours.save(str(tmp_path))
    assert os.listdir(tmp_path) == ["tokenizer.json"]
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.get_vocab_size() == 257 and hf.token_to_id("<|endoftext|>") == 256
    for text in STRINGS + arbitrary:
        assert hf.encode(text).ids == ours.encode(text), repr(text)
        assert hf.decode(ours.encode(text)) == text
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.fingerprint == ours.fingerprint
    assert (reloaded.eos_id, reloaded.vocab_size) == (256, 257)


def test_fingerprint(trained, tmp_path):
    folder, _ = trained
    first, second = load_tokenizer(folder), load_tokenizer(folder)
    assert first.fingerprint == second.fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", first.fingerprint)

    first.save(str(tmp_path / "saved"))
    assert sorted(os.listdir(tmp_path / "saved")) == ["tokenizer.json"]  # no temporary files left
    with open(os.path.join(folder, "tokenizer.json"), "rb") as original:
        assert (tmp_path / "saved" / "tokenizer.json").read_bytes() == original.read()
    assert load_tokenizer(str(tmp_path / "saved")).fingerprint == first.fingerprint

    train_tokenizer_json(str(tmp_path / "smaller"), vocab_size=1200)
    assert load_tokenizer(str(tmp_path / "smaller")).fingerprint != first.fingerprint
    assert load_tokenizer("byte").fingerprint != first.fingerprint

    # Same ranks and specials, but a different split pattern or no normalization: a different
    # mapping.
    def use_llama3_split(definition):
        definition["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = LLAMA3

    other_pattern = edited_tokenizer_json(folder, tmp_path / "llama_split", use_llama3_split)
    no_normalizer = edited_tokenizer_json(folder, tmp_path / "no_nfc",
                                          lambda d: d.update(normalizer=None))
    assert load_tokenizer(other_pattern).fingerprint != first.fingerprint
    assert load_tokenizer(no_normalizer).encode("e\u0301") != first.encode("e\u0301")
    assert load_tokenizer(no_normalizer).fingerprint != first.fingerprint


def test_save_copies_config_beside_tokenizer_json(trained, tmp_path):
    folder, _ = trained
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_bytes(open(os.path.join(folder, "tokenizer.json"),
                                                 "rb").read())
    # Models emit non-special added tokens too, as Qwen3 does.
    added = {"1999": {"content": "<|im_end|>", "special": True},
             "1998": {"content": "<think>", "special": False}}
    (source / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    ours = load_tokenizer(str(source))
    assert ours.encode("<|im_end|>", allow_special=True) == [1999]
    assert ours.encode("<think>", allow_special=True) == [1998] and ours.decode([1998]) == "<think>"
    assert len(ours.encode("<think>")) > 1
    assert ours.vocab_size == 2000
    ours.save(str(tmp_path / "copy"))
    assert sorted(os.listdir(tmp_path / "copy")) == ["tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(str(tmp_path / "copy")).fingerprint == ours.fingerprint


def edited_tokenizer_json(folder, new_folder, edit) -> str:
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as handle:
        definition = json.load(handle)
    edit(definition)
    new_folder.mkdir()
    (new_folder / "tokenizer.json").write_text(json.dumps(definition))
    return str(new_folder)


def test_bad_inputs(trained, tmp_path):
    folder, _ = trained
    missing = str(tmp_path / "no_such_checkpoint")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_tokenizer(missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError,
                       match=re.escape(str(empty)) + ".*tokenizer.json.*tokenizer.model"):
        load_tokenizer(str(empty))

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"model": {"type": "BPE", ')
    with pytest.raises(ValueError,
                       match=re.escape(str(corrupt / "tokenizer.json")) + ".*not valid JSON"):
        load_tokenizer(str(corrupt))

    cases = [
        ("lowercase", lambda d: d.update(normalizer={"type": "Lowercase"}), "Lowercase"),
        ("wordpiece", lambda d: d["model"].update(type="WordPiece"), "WordPiece"),
        ("metaspace", lambda d: d.update(pre_tokenizer={"type": "Metaspace"}), "Metaspace"),
        ("no_eos", lambda d: d["added_tokens"][0].update(content="<|pad|>"), re.escape("<|pad|>")),
        ("no_byte_0_but_unk", lambda d: (d["model"]["vocab"].pop("\u0100"),
                                         d["model"].update(unk_token="<|im_start|>")),
         "lacks some single bytes and names an unknown token"),
        ("digits_after_split", lambda d: d["pre_tokenizer"]["pretokenizers"].append(
            {"type": "Digits", "individual_digits": True}), "Digits"),
    ]
    for name, edit, offending in cases:
        path = edited_tokenizer_json(folder, tmp_path / name, edit)
        with pytest.raises(ValueError, match=re.escape(path) + ".*" + offending):
            load_tokenizer(path)


# ---- GPT-2's pre-tokenizer after Digits (SmolLM2, StarCoder), and vocabularies lacking bytes ----

DIGIT_EDGES = ["12345", " 5", "  5", "x  12", "a 1 b  22 c   333", "\n\n  7\n", "3.14159",
               "1,000,000", "v2.0", "①②", "٣٤٥", "１２３", "x\t\t9", "  \n 4", "it's 7's",
               "$12.50", "-3", " -3", "a1b2", "  ", "Total: 45 + 37 = 82\nThe answer is 82."]
MISSING_BYTE_EDGES = ["a\x04b", "!\x04!", "\x04", " \x04 ", "x\x1dy", " \x1d\x1d 5", "1\x042",
                      "\x06\x06", "a\x13\x14b", "  \x16  7", "ab\x1d\ncd",
                      "<|im_start|>\x04<|im_end|>"]


def digits_then_byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=True)])


def test_digits_before_byte_level_matches_hugging_face(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = digits_then_byte_level()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    hf.train_from_iterator(CORPUS * 3 + generated_corpus(), trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(str(tmp_path))
    for text in STRINGS + DIGIT_EDGES:
        assert ours.encode(text) == hf.encode(text).ids, repr(text)
    # Not GPT-2's regex with single digits: a run of spaces before a digit stays one piece.
    plain = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert plain.encode("x  12").tokens != hf.encode("x  12").tokens


def test_vocabulary_lacking_bytes_skips_them_like_hugging_face(trained, tmp_path):
    """Without an unknown token, Hugging Face drops a byte that has no token once the text is split,
    and the bytes around it may then merge: tiktoken alone cannot, so tokenizer.py does it by
    hand."""
    folder, _ = trained
    table = gpt2_byte_table()

    def drop_bytes(definition):
        for byte in (0x04, 0x1D, 0x06):
            del definition["model"]["vocab"][table[byte]]
    path = edited_tokenizer_json(folder, tmp_path / "lacking", drop_bytes)
    hf = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
    ours = load_tokenizer(path)
    assert hf.encode("!\x04!").tokens == ["!!"]  # merged across the skipped byte
    texts = STRINGS + MISSING_BYTE_EDGES + \
        [text.replace(" ", "\x04 ") for text in STRINGS[:100]] + \
        [text.replace("e", "\x1d") for text in STRINGS[:100]]
    for text in texts:
        assert ours.encode(text, allow_special=True) == hf.encode(text).ids, repr(text)
    assert ours.encode("a\x04b") == ours.encode("a") + ours.encode("b")


def test_smollm2_ids_match_hugging_face(smollm2):
    """The converted SmolLM2 tokenizer.json carries Hugging Face's own pre-tokenizer for SmolLM2,
    so HF `tokenizers` on it is the reference; 0 mismatches over problems, library text and
    edges."""
    definition = json.loads((smollm2 / "tokenizer.json").read_text())
    assert definition["normalizer"] is None
    assert [step["type"] for step in definition["pre_tokenizer"]["pretokenizers"]] == \
        ["Digits", "ByteLevel"]
    assert definition["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] is True
    hf = HFTokenizer.from_file(str(smollm2 / "tokenizer.json"))
    ours = load_tokenizer(str(smollm2))
    assert (ours.vocab_size, ours.eos_id) == (49152, 0)
    texts = ([format_problem(p) for p in generate_problems(300, seed=0)]
             + [text for _, text in stdlib_documents()] + STRINGS + DIGIT_EDGES
             + MISSING_BYTE_EDGES + ["<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"])
    # HF matches special tokens wherever they appear; ours does so only when allowed.
    mismatches = [text[:80] for text in texts
                  if ours.encode(text, allow_special=True) != hf.encode(text).ids]
    assert mismatches == []
    assert ours.encode("  5") == [hf.token_to_id("ĠĠ"), hf.token_to_id("5")]
    assert ours.decode(ours.encode(texts[0])) == texts[0]
