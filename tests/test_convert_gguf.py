"""convert_gguf.py against transformers' own GGUF loader, and against the models a GGUF was made
from.

Tiny GGUF files are written here the way llama.cpp's converter writes them (its tensor names,
metadata keys and its reordering of Llama's q/k rows), from tiny random transformers models."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from convert_gguf import convert, unpermute_rope_rows
from model import MODEL_SIZES, Transformer
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "Question: Tom has 12 apples and buys 35 more. How many apples does he have?\n"
    "Answer: 12 + 35 = 47\nThe answer is 47.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The capital of France is Paris. It is known for the Eiffel Tower,   built in 1889.",
    "Ünïcödé 你好 😀 and  2  spaces\n\n\tthen a tab",
]


def llama_cpp_permute(weight, n_heads):
    """llama.cpp's reordering of a Llama q or k projection, written out independently: each head's
    rows (first half, second half) become interleaved pairs, for its adjacent-pairs RoPE."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


# ---- a tiny GGUF, written as llama.cpp writes one ----------------------------------------------

TINY = dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, tie_word_embeddings=False)
HF_TO_GGUF = {"input_layernorm.weight": "attn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.q_proj.bias": "attn_q.bias",
              "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias",
              "self_attn.q_norm.weight": "attn_q_norm.weight",
              "self_attn.k_norm.weight": "attn_k_norm.weight",
              "self_attn.o_proj.weight": "attn_output.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}


def tiny_hf_model(arch, **overrides):
    torch.manual_seed(0)
    settings = {**TINY, **overrides}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**settings, rope_theta=10000.0))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**settings, rope_theta=1e6))
    else:
        # head_dim 128 as in every Qwen3: transformers' GGUF reader assumes it (ours reads
        # key_length)
        model = Qwen3ForCausalLM(Qwen3Config(**settings, head_dim=128, rope_theta=1e6))
    with torch.no_grad():  # random norms and biases, so that a swapped or missing one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model.eval()


def gpt2_vocabulary():
    """256 byte tokens (GPT-2's characters, ids in byte order), two merges, and <|endoftext|>."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for byte in range(256):
        chars[byte] = chr(byte) if byte in printable else chr(256 + shifted)
        shifted += byte not in printable
    tokens = [chars[b] for b in range(256)] + ["Ġt", "he", "<|endoftext|>"]
    return tokens, [1] * 258 + [3], ["Ġ t", "h e"]


def write_gguf(path, model, arch, quantization=gguf.GGMLQuantizationType.F32, edit_tensors=None,
               rope_freqs=None):
    """model (transformers) -> a GGUF file at path, with llama.cpp's names, keys and q/k order."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_vocab_size(c.vocab_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "qwen3":
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    tokens, types, merges = gpt2_vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(258)
    tensors = {}
    for name, p in model.state_dict().items():
        weight = p.detach().float().numpy()
        if name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        elif name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{HF_TO_GGUF[rest]}"
            if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                heads = c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads
                weight = llama_cpp_permute(weight, heads)
        tensors[gguf_name] = weight
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = rope_freqs
    for gguf_name, weight in (edit_tensors or (lambda t: t))(tensors).items():
        # (quantized blocks as bytes, their type), written as they are
        if isinstance(weight, tuple):
            writer.add_tensor(gguf_name, weight[0], raw_dtype=weight[1])
        elif weight.ndim == 2 and quantization != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(weight, quantization),
                              raw_dtype=quantization)
        else:
            writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---- the real model --------------------------------------------------------------------------

def test_smollm2_matches_transformers_gguf_load(smollm2, smollm2_gguf):
    ours = Transformer.from_pretrained(smollm2).eval()
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.intermediate_size, c.vocab_size, c.rope_theta,
            c.tie_word_embeddings) == (30, 576, 9, 3, 64, 1536, 49152, 1e5, True)
    # The named shape in model.py.
    assert c == replace(MODEL_SIZES["SmolLM2-135M"], bos_token_id=1, eos_token_id=2)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent,
                                                     gguf_file=smollm2_gguf.name,
                                                     dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(smollm2))
    for text in TEXTS:
        idx = torch.tensor([tokenizer.encode(text)])
        assert (logits(ours, idx) - logits(reference, idx)).abs().max().item() <= 1e-4, text
    # A real pretrained model: the worked solution of a word problem costs well under 3 nats a token
    # (a random model of this vocabulary: log 49152 = 10.8).
    idx = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        assert ours(idx[:, :-1], idx[:, 1:])[1].item() < 3.0


def test_smollm2_folder_has_the_files_of_a_download(smollm2):
    assert sorted(p.name for p in smollm2.iterdir()) == ["config.json", "generation_config.json",
                                                        "model.safetensors", "tokenizer.json",
                                                        "tokenizer_config.json"]
    config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in config["chat_template"]
    assert json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"] == 2
    tokenizer = load_tokenizer(str(smollm2))
    assert tokenizer.eos_id == 0
    assert tokenizer.encode("<|im_start|><|im_end|>", allow_special=True) == [1, 2]


# ---- tiny files of each architecture ---------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("quantization", ["F32", "Q8_0"])
def test_tiny_models_match_their_source_and_transformers_gguf_load(arch, quantization, tmp_path):
    source = tiny_hf_model(arch, tie_word_embeddings=arch == "qwen3")
    path = write_gguf(tmp_path / "tiny.gguf", source, arch,
                      getattr(gguf.GGMLQuantizationType, quantization))
    convert(path, tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.tie_word_embeddings == (arch == "qwen3")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                     dtype=torch.float32).eval()
    idx = torch.randint(0, 260, (2, 37))
    assert (logits(ours, idx) - logits(reference, idx)).abs().max().item() <= 1e-4
    if quantization == "F32":  # nothing lost: the model the file was written from
        assert (logits(ours, idx) - logits(source, idx)).abs().max().item() <= 1e-4


def test_llama_q_and_k_rows_are_put_back():
    """unpermute_rope_rows inverts llama.cpp's order, and the two orders are two layouts of one
    RoPE: adjacent pairs rotated on the permuted rows give the attention scores of split halves."""
    torch.manual_seed(0)
    heads, head_dim, d, T = 3, 8, 16, 5
    q_weight, k_weight, x = (torch.randn(heads * head_dim, d), torch.randn(heads * head_dim, d),
                             torch.randn(T, d))
    permuted = llama_cpp_permute(q_weight, heads)
    assert not torch.equal(permuted, q_weight)
    assert torch.equal(unpermute_rope_rows(permuted, heads), q_weight)
    # (T, hd/2)
    angles = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(head_dim // 2) / (head_dim // 2))
    cos, sin = angles.cos(), angles.sin()

    def split_halves(v):   # (T, heads, hd): dimension i turns with i + hd/2
        a, b = v.chunk(2, dim=-1)
        return torch.cat((a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]),
                         dim=-1)

    def adjacent_pairs(v):  # (T, heads, hd): dimension 2i turns with 2i + 1
        a, b = v[..., 0::2], v[..., 1::2]
        rotated = (a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None])
        return torch.stack(rotated, -1).flatten(-2)

    def scores(rope, wq, wk):
        q, k = (rope((x @ w.T).view(T, heads, head_dim)) for w in (wq, wk))
        return torch.einsum("thd,shd->hts", q, k)

    reference = scores(split_halves, q_weight, k_weight)
    as_llama_cpp = scores(adjacent_pairs, permuted, llama_cpp_permute(k_weight, heads))
    assert torch.allclose(as_llama_cpp, reference, atol=1e-4)
    # Loading the permuted rows as they are: wrong scores.
    assert not torch.allclose(scores(split_halves, permuted, llama_cpp_permute(k_weight, heads)),
                              reference, atol=1e-2)


def test_q4_1_block_dequantized_by_hand(tmp_path):
    """Q4_1: blocks of 32 values, each an fp16 scale d, an fp16 minimum m and 16 bytes of 4-bit
    codes q; value j is d * q_j + m, codes 0-15 in the low nibbles and 16-31 in the high ones."""
    rng = np.random.default_rng(0)
    source = tiny_hf_model("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    codes = rng.integers(0, 16, size=(260, 32)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, size=260).astype(np.float16)
    minimums = rng.uniform(-0.5, 0.0, size=260).astype(np.float16)
    blocks = np.concatenate([scales[:, None].view(np.uint8), minimums[:, None].view(np.uint8),
                             codes[:, :16] | (codes[:, 16:] << 4)], axis=1)  # (260, 20) bytes
    expected = scales.astype(np.float32)[:, None] * codes + minimums.astype(np.float32)[:, None]

    def embedding_as_q4_1(tensors):
        tensors["token_embd.weight"] = (blocks, gguf.GGMLQuantizationType.Q4_1)
        return tensors
    path = write_gguf(tmp_path / "q4_1.gguf", source, "llama", edit_tensors=embedding_as_q4_1)
    convert(path, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    embedding = tensors["model.embed_tokens.weight"].numpy()
    assert np.array_equal(embedding, expected)


def test_llama3_rope_scaling_is_read_from_rope_freqs(tmp_path):
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    source = tiny_hf_model("llama", max_position_embeddings=131072, rope_scaling=dict(scaling))
    # What llama.cpp stores: per frequency, the divisor that turns the base frequency into the
    # scaled one.
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    base = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    divisors = (base / LlamaRotaryEmbedding(source.config).inv_freq).numpy()
    assert divisors.max() == 8.0 and divisors.min() == 1.0
    convert(write_gguf(tmp_path / "l3.gguf", source, "llama", rope_freqs=divisors), tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.rope_scaling == {k: v for k, v in scaling.items() if k != "rope_type"}
    idx = torch.randint(0, 260, (1, 40))
    assert (logits(ours, idx) - logits(source, idx)).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="rope_freqs.weight is not Llama 3's rope scaling"):
        convert(write_gguf(tmp_path / "odd.gguf", source, "llama", rope_freqs=divisors ** 0.5),
                tmp_path / "odd")


# ---- bad input: a clear error, and nothing written ------------------------------------------

@pytest.fixture
def tiny_gguf(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf", tiny_hf_model("llama"), "llama")


def assert_nothing_written(out):
    assert not out.exists()
    # no temporary folder
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_not_a_gguf_and_truncated_files(tiny_gguf, tmp_path):
    (tmp_path / "text.gguf").write_text("hello, I am not a model")
    data = tiny_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    (tmp_path / "header_only.gguf").write_bytes(data[:200])
    for name in ("text.gguf", "cut.gguf", "header_only.gguf"):
        with pytest.raises(ValueError,
                           match=f"{name} is not a readable GGUF file.*truncated or corrupt"):
            convert(tmp_path / name, tmp_path / "out")
        assert_nothing_written(tmp_path / "out")


def test_unsupported_architecture_and_quantization(tmp_path):
    source = tiny_hf_model("llama")
    path = write_gguf(tmp_path / "gpt2.gguf", source, "gpt2")
    with pytest.raises(ValueError,
                       match="architecture 'gpt2' is not supported; .*llama, qwen2, qwen3"):
        convert(path, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")

    def norm_as_q8_1(tensors):  # Q8_1 exists in ggml, but no reader dequantizes it
        tensors["output_norm.weight"] = (np.zeros(80, np.uint8), gguf.GGMLQuantizationType.Q8_1)
        return tensors
    path = write_gguf(tmp_path / "q8_1.gguf", source, "llama", edit_tensors=norm_as_q8_1)
    with pytest.raises(ValueError, match="output_norm.weight is quantized as Q8_1"):
        convert(path, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_unknown_tensor_and_existing_output(tiny_gguf, tmp_path):
    unknown = {"blk.0.attn_gate.weight": np.zeros((4, 4), np.float32)}
    path = write_gguf(tmp_path / "extra.gguf", tiny_hf_model("llama"), "llama",
                      edit_tensors=lambda t: {**t, **unknown})
    with pytest.raises(ValueError, match="tensor blk.0.attn_gate.weight has no counterpart"):
        convert(path, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="out already exists"):
        convert(tiny_gguf, tmp_path / "out")


def test_missing_gguf_package_and_the_command_line(tiny_gguf, tmp_path, monkeypatch):
    command = [sys.executable, "convert_gguf.py", "--gguf", str(tmp_path / "nowhere.gguf"),
               "--out", str(tmp_path / "o")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: --gguf {tmp_path / 'nowhere.gguf'} does not exist"
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    with pytest.raises(ImportError, match="needs the `gguf` package.*pip install gguf"):
        convert(tiny_gguf, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
