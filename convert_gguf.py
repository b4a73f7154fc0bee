"""
A GGUF file (llama.cpp's format, in which local-LLM tools ship models) -> a Hugging Face folder
that Transformer.from_pretrained and load_tokenizer read like any download.

    python convert_gguf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out checkpoints/SmolLM2-135M-Instruct

The `gguf` package (llama.cpp's own reader, needed only here) parses the file and dequantizes
every tensor to fp32. Tensor names are mapped onto Hugging Face's, the rows of Llama's q and k
projections are put back in the order Hugging Face uses (see unpermute_rope_rows), and the folder
gets config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
generation_config.json. Architectures: llama (Llama 2/3, SmolLM), qwen2 (Qwen2, Qwen2.5) and
qwen3. Tokenizers: byte-level BPE ("gpt2" in GGUF) with the pre-tokenizers of those families.

The folder is written under a temporary name, loaded back as training will load it, and only then
renamed into place: an error or an interruption leaves nothing at --out.
"""

import argparse
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model import ModelConfig, Transformer, replace_durably, rope_inverse_frequencies
from tokenizer import LLAMA3_PATTERN, QWEN_PATTERN, load_tokenizer

ARCHITECTURES = ("llama", "qwen2", "qwen3")

# llama.cpp's tensor names -> Hugging Face's. Per block: blk.{i}.<key> -> model.layers.{i}.<value>.
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",          # qwen2
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}

# tokenizer.ggml.pre (llama.cpp's name for a pre-tokenizer) -> (HF pre_tokenizer steps, normalizer).
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
              "use_regex": True}
BYTE_LEVEL_AFTER_SPLIT = {**BYTE_LEVEL, "use_regex": False}


def _split(pattern):
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS = {
    "gpt-2": ([BYTE_LEVEL], None),
    # SmolLM, StarCoder
    "smollm": ([{"type": "Digits", "individual_digits": True}, BYTE_LEVEL], None),
    "starcoder": ([{"type": "Digits", "individual_digits": True}, BYTE_LEVEL], None),
    "qwen2": ([_split(QWEN_PATTERN), BYTE_LEVEL_AFTER_SPLIT], {"type": "NFC"}),
    "llama-bpe": ([_split(LLAMA3_PATTERN), BYTE_LEVEL_AFTER_SPLIT], None),
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of added (non-BPE) tokens


def read_gguf(path):
    """A GGUFReader over path, with errors that name the file."""
    try:
        import gguf
    except ImportError:
        raise ImportError("convert_gguf.py needs the `gguf` package (llama.cpp's reader): "
                          "pip install gguf (make smollm2 installs it)") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--gguf {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # bad magic, a truncated header or tensor table, an unknown version
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be "
                         "truncated or corrupt: download it again") from None


def metadata(reader) -> dict:
    """Every key-value field of the file as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def model_config(meta, arch, tensors, source) -> ModelConfig:
    """The ModelConfig that the {arch}.* metadata keys and the tensor list describe."""
    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{source}: metadata key {arch}.{name} is missing; "
                             "the file is incomplete")
        # Floats are stored as float32; config.json held the shortest decimal that rounds to it.
        return float(str(np.float32(value))) if isinstance(value, float) else value
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in tensors}  # GGUF order: (d, vocab)
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{source}: there is no token_embd.weight tensor; the file is incomplete")
    return ModelConfig(
        # The embedding's rows, not the tokenizer's count: Qwen pads its matrix beyond the tokens.
        model_type=arch, vocab_size=shapes["token_embd.weight"][-1], hidden_size=hidden,
        intermediate_size=key("feed_forward_length"), num_hidden_layers=key("block_count"),
        num_attention_heads=heads, num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=key("attention.key_length", hidden // heads),
        max_position_embeddings=key("context_length"), rope_theta=key("rope.freq_base", 10000.0),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))


def unpermute_rope_rows(weight, n_heads):
    """Undo llama.cpp's reordering of a Llama q or k projection: weight (n_heads * head_dim, d).

    llama.cpp rotates pairs of ADJACENT dimensions (0, 1), (2, 3), ... of each head, while Hugging
    Face (and model.py) rotate dimension i with dimension i + head_dim / 2 (split halves). Its
    converter makes the two agree by permuting the projection's rows within every head: the rows
    of the two halves are interleaved, half[0][0], half[1][0], half[0][1], half[1][1], ...
    Loading such weights without undoing that gives a model that runs, yet attends with
    scrambled positions: the classic trap of this conversion. Qwen's GGUFs are not permuted."""
    rows, d = weight.shape
    # (heads, head_dim / 2, 2, d): rows of one head as interleaved pairs
    # -> (heads, 2, head_dim / 2, d)
    return weight.reshape(n_heads, rows // n_heads // 2, 2, d).transpose(1, 2).reshape(rows, d)


def llama3_rope_scaling(rope_factors, config, source):
    """Llama 3.1 / 3.2 GGUFs store their "llama3" RoPE scaling as rope_freqs.weight, one divisor per
    frequency, not as the four parameters of config.json. Those are recovered by matching the
    divisors against the parameters that every Llama 3.1 and 3.2 release uses, with the factor
    read off the largest divisor."""
    scaling = dict(factor=float(rope_factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    base = rope_inverse_frequencies(config)
    scaled = rope_inverse_frequencies(replace(config, rope_scaling=scaling))
    if not torch.allclose(base / scaled, torch.tensor(rope_factors, dtype=torch.float32),
                          rtol=1e-4):
        raise ValueError(f"{source}: rope_freqs.weight is not Llama 3's rope scaling with low/high "
                         "frequency factors 1 and 4 and an original context of 8192; this RoPE "
                         "scaling is not supported")
    return scaling


def dequantize(tensor, source):
    """One GGUF tensor -> float32 numpy array in PyTorch's order (GGUF lists shapes reversed)."""
    import gguf
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{source}: tensor {tensor.name} is quantized as "
                         f"{tensor.tensor_type.name}, which the gguf package cannot dequantize; "
                         "convert a file with another quantization "
                         "(Q8_0, Q4_K_M, F16, ...)") from None
    return values.reshape(tuple(reversed(tensor.shape.tolist()))).astype(np.float32, copy=False)


def hf_tensors(reader, config, source) -> dict:
    """{Hugging Face name: float32 tensor} of every weight in the file."""
    tensors = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name == "rope_freqs.weight":  # not a weight: the RoPE scaling, read into the config
            config.rope_scaling = llama3_rope_scaling(dequantize(tensor, source), config, source)
            continue
        prefix, layer, suffix = (name.split(".", 2) + ["", ""])[:3]  # blk.{i}.<suffix>
        if name in GLOBAL_NAMES:
            hf_name = GLOBAL_NAMES[name]
        elif prefix == "blk" and layer.isdigit() and suffix in BLOCK_NAMES:
            hf_name = f"model.layers.{layer}.{BLOCK_NAMES[suffix]}"
        else:
            raise ValueError(f"{source}: tensor {name} has no counterpart in a "
                             f"{config.model_type} model")
        weight = torch.from_numpy(dequantize(tensor, source).copy())
        if config.model_type == "llama" and suffix in ("attn_q.weight", "attn_k.weight"):
            n_heads = (config.num_attention_heads if suffix == "attn_q.weight"
                       else config.num_key_value_heads)
            weight = unpermute_rope_rows(weight, n_heads)
        tensors[hf_name] = weight
    return tensors


def tokenizer_files(meta, source) -> dict:
    """tokenizer.json and tokenizer_config.json, as Hugging Face writes them, from
    tokenizer.ggml.*."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model is {kind!r}; "
                         "only byte-level BPE ('gpt2') is supported")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                         f"supported: {', '.join(PRE_TOKENIZERS)}")
    steps, normalizer = PRE_TOKENIZERS[pre]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind_ == CONTROL}
             for i, (t, kind_) in enumerate(zip(tokens, types)) if kind_ in (CONTROL, USER_DEFINED)]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": (steps[0] if len(steps) == 1
                          else {"type": "Sequence", "pretokenizers": steps}),
        "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                                            "trim_offsets": True, "use_regex": True},
        # No unknown token: a byte without a token of its own is skipped (SmolLM2 lacks 21 of them).
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [merge.split(" ") for merge in meta.get("tokenizer.ggml.merges", [])]},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": meta.get(f"{meta['general.architecture']}.context_length"),
              "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                       for t in added}}
    for role in ("bos", "eos", "unknown", "padding"):
        id_ = meta.get(f"tokenizer.ggml.{role}_token_id")
        if id_ is not None:
            config[{"unknown": "unk", "padding": "pad"}.get(role, role) + "_token"] = tokens[id_]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config}


def convert(gguf_path, out):
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"--out {out} already exists; delete it or choose another folder")
    reader = read_gguf(gguf_path)
    source = str(gguf_path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source}: architecture {arch!r} is not supported; this converter reads "
                         f"{', '.join(ARCHITECTURES)}")
    config = model_config(meta, arch, reader.tensors, source)
    tensors = hf_tensors(reader, config, source)
    files = tokenizer_files(meta, source)

    with torch.device("meta"):
        model = Transformer(config)
    for name, parameter in model.named_parameters():
        hf_name = Transformer.hf_name(name)
        if hf_name not in tensors:
            raise ValueError(f"{source}: no tensor for {hf_name}; the file is incomplete")
        if tensors[hf_name].shape != parameter.shape:
            raise ValueError(f"{source}: {hf_name} has shape {tuple(tensors[hf_name].shape)}, but "
                             f"the metadata describes {tuple(parameter.shape)}; "
                             "the file is inconsistent")
    model.load_state_dict({n: tensors[Transformer.hf_name(n)] for n, _ in model.named_parameters()},
                          strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight

    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        model.save_pretrained(temporary)
        for name, content in files.items():
            (temporary / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        generation = {k: v for k, v in (
            ("bos_token_id", config.bos_token_id), ("eos_token_id", config.eos_token_id),
            ("pad_token_id", meta.get("tokenizer.ggml.padding_token_id"))) if v is not None}
        (temporary / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        # Every name and shape checked, as training will read them.
        Transformer.from_pretrained(temporary)
        load_tokenizer(str(temporary))
        replace_durably(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True,
                        help="a .gguf file (llama, qwen2 or qwen3 architecture)")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to create")
    args = parser.parse_args(argv)
    config = convert(args.gguf, args.out)
    print(f"wrote {args.out}: {config.model_type}, {config.num_hidden_layers} layers, "
          f"d {config.hidden_size}, vocab {config.vocab_size}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ImportError, ValueError) as e:
        sys.exit(f"error: {e}")
