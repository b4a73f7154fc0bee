"""Byte-level BPE tokenizers for Qwen2 / Qwen2.5 / Qwen3, Llama 3 and SmolLM2 checkpoints, run by
tiktoken.

load_tokenizer(path) reads, from a checkpoint folder or the file itself:
  - tokenizer.json (Hugging Face byte-level BPE: Qwen2/2.5/3, Llama 3, SmolLM2 and others with
    GPT-2's pre-tokenizer), plus the special tokens of a tokenizer_config.json beside it;
  - vocab.json + merges.txt (the older Qwen2 layout);
  - tokenizer.model (Llama 3's tiktoken rank file);
and "byte" names the built-in byte tokenizer of the CPU demo.

Every format becomes a tiktoken Encoding: the BPE ranks are the vocabulary ids, which holds because
these vocabularies were built merge by merge, each new token taking the next id.
"""

import base64
import hashlib
import json
import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import regex  # tiktoken's own dependency: the same Unicode classes as its patterns
import tiktoken

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM / StarCoder: a Digits(individual_digits) step, then GPT-2's regex on each piece it leaves.
# That is not GPT-2's regex with single digits: the Digits step ends a piece before every digit, so
# a space never joins a digit (" 5" is " ", "5") and a run of spaces before a digit stays whole
# ("  5" is "  ", "5"; GPT-2 alone gives " ", " 5"). Hence the last lookahead: a digit ends a piece.
GPT2_DIGITS_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)

END_OF_TEXT_NAMES = ("<|endoftext|>", "<|end_of_text|>")  # Qwen, Llama 3

# tokenizer.model holds only the ranks; Llama 3.1 appends 256 special tokens after them, in this
# order, the rest being <|reserved_special_token_3|> onwards.
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_SPECIAL_COUNT = 256


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table. Vocabulary files store tokens as text, so printable
    Latin-1 bytes stand for themselves and the rest move to code points 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    unprintable = [byte for byte in range(256) if byte not in table]
    for offset, byte in enumerate(unprintable):
        table[byte] = chr(256 + offset)
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}


def _token_bytes(token: str, file: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[char] for char in token)
    except KeyError:
        raise ValueError(f"{file}: token {token!r} is not in GPT-2's byte-level alphabet; "
                         "only byte-level BPE vocabularies are supported") from None


def _parse_json(raw: bytes, file: str) -> dict:
    try:
        return json.loads(raw)
    except ValueError as error:
        raise ValueError(f"{file} is not valid JSON ({error}); "
                         "restore the checkpoint's original file") from None


def _write_atomically(file: str, data: bytes) -> None:
    # A reader (or a crash) must never see a half-written tokenizer file.
    temporary = f"{file}.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the rename, which can otherwise get there first
    os.replace(temporary, file)


def _config_added_tokens(folder: str) -> tuple[dict[int, str], dict[str, bytes]]:
    """Added tokens by id from tokenizer_config.json beside a vocabulary, and the file to keep."""
    file = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(file):
        return {}, {}
    raw = Path(file).read_bytes()
    decoder = _parse_json(raw, file).get("added_tokens_decoder", {})
    return ({int(id_): entry["content"] for id_, entry in decoder.items()},
            {"tokenizer_config.json": raw})


def _pre_split_pattern(pre_tokenizer: dict | None, file: str) -> str:
    """The regex that splits text before BPE, from a byte-level pre-tokenizer definition."""
    if pre_tokenizer and pre_tokenizer.get("type") == "Sequence":
        steps = pre_tokenizer.get("pretokenizers", [])
    else:
        steps = [pre_tokenizer]
    patterns, byte_level, digits = [], False, False
    for step in steps:
        kind = step.get("type") if step else None
        if (kind == "Split" and "Regex" in step.get("pattern", {})
                and step.get("behavior") == "Isolated" and not step.get("invert")):
            patterns.append(step["pattern"]["Regex"])
        elif kind == "Digits" and step.get("individual_digits") and not (patterns or byte_level):
            digits = True
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            byte_level = True
            if step.get("use_regex", True):
                patterns.append(GPT2_DIGITS_PATTERN if digits else GPT2_PATTERN)
        else:
            raise ValueError(f"{file}: pre-tokenizer {step!r} is not supported; expected an "
                             "isolated Split on a Regex and/or ByteLevel without add_prefix_space, "
                             "or Digits(individual_digits) before ByteLevel")
    if not byte_level or len(patterns) != 1 or (digits and patterns != [GPT2_DIGITS_PATTERN]):
        raise ValueError(f"{file}: pre-tokenizer {pre_tokenizer!r} is not supported; expected "
                         "exactly one split pattern and a ByteLevel step (a byte-level BPE "
                         "tokenizer)")
    return patterns[0]


class Tokenizer:
    """A tiktoken Encoding plus what a model family needs around it: NFC, the end-of-text id,
    a fingerprint of the mapping, and the files that recreate it.

    A vocabulary may lack some single bytes (SmolLM2 has no token for 21 of them, among them the
    control characters \\x04 and \\x1d). Hugging Face's BPE, with no unknown token, then skips
    such a byte after pre-tokenization, so the bytes around it can merge ("!\\x04!" is "!!").
    tiktoken cannot encode such a byte at all, so text that holds one takes a slower path that
    does the same as Hugging Face."""

    def __init__(self, name: str, pattern: str, ranks: dict[bytes, int],
                 specials_by_id: dict[int, str], nfc: bool, files: dict[str, bytes]):
        self._missing_bytes = bytes(byte for byte in range(256) if bytes([byte]) not in ranks)
        if len(self._missing_bytes) > 64:
            raise ValueError(f"{name}: the vocabulary lacks {len(self._missing_bytes)} of the 256 "
                             "single-byte tokens; expected a byte-level BPE vocabulary")
        if len(set(ranks.values())) != len(ranks):
            raise ValueError(f"{name}: several vocabulary tokens share an id; "
                             "each id must name one token")
        special_tokens = {token: id_ for id_, token in specials_by_id.items()}
        eos_name = next((token for token in END_OF_TEXT_NAMES if token in special_tokens), None)
        if eos_name is None:
            raise ValueError(f"{name}: no end-of-text token among the special tokens "
                             f"{sorted(special_tokens)}; expected one of "
                             f"{list(END_OF_TEXT_NAMES)}, which tokenizer_config.json's "
                             "added_tokens_decoder can declare")
        self.name = name
        self.eos_id = special_tokens[eos_name]
        self._nfc = nfc
        self._files = files
        self._encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                           special_tokens=special_tokens)
        self._pieces = regex.compile(pattern)
        self._specials = regex.compile("(" + "|".join(map(regex.escape, special_tokens)) + ")")
        self._special_ids = special_tokens
        self.vocab_size = self._encoding.n_vocab
        definition = {
            "pattern": pattern,
            "normalization": "NFC" if nfc else None,
            "ranks": [[rank, token.hex()]
                      for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])],
            "special_tokens": sorted(specials_by_id.items()),
        }
        self.fingerprint = hashlib.sha256(json.dumps(definition).encode()).hexdigest()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        if self._missing_bytes:
            raw = text.encode("utf-8", "replace")
            if len(raw.translate(None, self._missing_bytes)) != len(raw):
                return self._encode_skipping_missing_bytes(text, allow_special)
        if allow_special:
            return self._encoding.encode(text, allowed_special="all")
        # Training text that merely mentions "<|endoftext|>" must not end a document.
        return self._encoding.encode_ordinary(text)

    def _encode_skipping_missing_bytes(self, text: str, allow_special: bool) -> list[int]:
        ids = []
        # With capturing parentheses, split puts each special token at an odd index.
        parts = self._specials.split(text) if allow_special else [text]
        for index, part in enumerate(parts):
            if index % 2:
                ids.append(self._special_ids[part])
                continue
            for piece in self._pieces.findall(part):
                kept = piece.encode("utf-8", "replace").translate(None, self._missing_bytes)
                ids += self._encoding.encode_ordinary(kept.decode()) if kept else []
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode([int(id_) for id_ in ids], errors="replace")

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        for file_name, data in self._files.items():
            _write_atomically(os.path.join(folder, file_name), data)


def _byte_tokenizer() -> Tokenizer:
    """The CPU demo's tokenizer: ids 0..255 are the bytes themselves and 256 is <|endoftext|>.
    It needs no training step and covers any text; its tiny vocabulary keeps a tiny model's
    parameters in its layers rather than its embedding; and digit-by-digit tokens suit
    arithmetic."""
    eos = "<|endoftext|>"
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 256, "content": eos, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_PATTERN}, "behavior": "Isolated",
             "invert": False},
            byte_level]},
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False,
                  "vocab": {BYTE_TO_CHAR[byte]: byte for byte in range(256)}, "merges": []},
    }
    files = {"tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False, indent=2).encode()}
    ranks = {bytes([byte]): byte for byte in range(256)}
    return Tokenizer("byte", QWEN_PATTERN, ranks, {256: eos}, nfc=False, files=files)


def _from_tokenizer_json(file: str) -> Tokenizer:
    raw = Path(file).read_bytes()
    definition = _parse_json(raw, file)
    model = definition.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{file}: model type {model.get('type')!r} is not supported; "
                         "expected a byte-level 'BPE' model (Qwen2/2.5/3, Llama 3)")
    normalizer = definition.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ValueError(f"{file}: normalizer type {normalizer.get('type')!r} is not supported; "
                         "expected null or NFC")
    pattern = _pre_split_pattern(definition.get("pre_tokenizer"), file)
    config_ids, config_files = _config_added_tokens(os.path.dirname(file))
    # Non-special added tokens (Qwen's <tool_call>, <think>) are kept as well: models emit them,
    # so decode must know them; like the specials, encode produces them only when allowed.
    specials_by_id = {entry["id"]: entry["content"] for entry in definition.get("added_tokens", [])}
    specials_by_id.update(config_ids)
    # A trained vocabulary may list its special tokens in model.vocab too; they stay specials only.
    ranks = {_token_bytes(token, file): id_ for token, id_ in model.get("vocab", {}).items()
             if id_ not in specials_by_id}
    if model.get("unk_token") is not None and any(bytes([byte]) not in ranks
                                                  for byte in range(256)):
        raise ValueError(f"{file}: the vocabulary lacks some single bytes and names an unknown "
                         f"token ({model['unk_token']!r}) for them; only vocabularies that skip "
                         "such bytes are supported")
    return Tokenizer(file, pattern, ranks, specials_by_id, nfc=normalizer is not None,
                     files={"tokenizer.json": raw, **config_files})


def _from_vocab_and_merges(folder: str) -> Tokenizer:
    vocab_file = os.path.join(folder, "vocab.json")
    vocab_raw = Path(vocab_file).read_bytes()
    merges_raw = Path(folder, "merges.txt").read_bytes()
    vocab = _parse_json(vocab_raw, vocab_file)
    specials_by_id, config_files = _config_added_tokens(folder)
    if not specials_by_id:
        specials_by_id = {len(vocab): "<|endoftext|>"}  # Qwen2's 151643 after its 151,643 tokens
    ranks = {_token_bytes(token, vocab_file): id_ for token, id_ in vocab.items()
             if id_ not in specials_by_id}
    files = {"vocab.json": vocab_raw, "merges.txt": merges_raw, **config_files}
    return Tokenizer(folder, QWEN_PATTERN, ranks, specials_by_id, nfc=True, files=files)


def _from_tiktoken_model(file: str) -> Tokenizer:
    raw = Path(file).read_bytes()
    ranks = {}
    for line_number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{file}, line {line_number}: expected 'base64-token rank', "
                             f"got {line[:80]!r}; is this a Llama 3 tokenizer.model?") from None
    reserved_count = LLAMA3_SPECIAL_COUNT - len(LLAMA3_NAMED_SPECIALS)
    names = LLAMA3_NAMED_SPECIALS + [f"<|reserved_special_token_{n}|>"
                                     for n in range(3, 3 + reserved_count)]
    specials_by_id = {len(ranks) + offset: name for offset, name in enumerate(names)}
    config_ids, config_files = _config_added_tokens(os.path.dirname(file))
    specials_by_id.update(config_ids)
    return Tokenizer(file, LLAMA3_PATTERN, ranks, specials_by_id, nfc=False,
                     files={"tokenizer.model": raw, **config_files})


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at path: "byte", a checkpoint folder, or a tokenizer.json / tokenizer.model
    file."""
    if path == "byte":
        return _byte_tokenizer()
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path} does not exist; pass a checkpoint folder, "
                                "a tokenizer.json or tokenizer.model file, or 'byte'")
    if os.path.isfile(path):
        return _from_tokenizer_json(path) if path.endswith(".json") else _from_tiktoken_model(path)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return _from_tokenizer_json(os.path.join(path, "tokenizer.json"))
    if all(os.path.isfile(os.path.join(path, name)) for name in ("vocab.json", "merges.txt")):
        return _from_vocab_and_merges(path)
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        return _from_tiktoken_model(os.path.join(path, "tokenizer.model"))
    raise FileNotFoundError(f"{path} holds no tokenizer: looked for tokenizer.json, then "
                            "vocab.json + merges.txt, then tokenizer.model; point at a checkpoint "
                            "folder that has one of them, or pass 'byte'")
