"""model.py against transformers: logits, RoPE, export, generation, fused loss, bad checkpoints."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from model import (MODEL_SIZES, LinearCrossEntropy, ModelConfig, Transformer, config_from_hf,
                   rope_inverse_frequencies)

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)


def hf_model(kind):
    torch.manual_seed(0)
    if kind == "qwen3_tied":
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True))
    elif kind == "qwen3_untied":
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False))
    elif kind == "qwen2_bias":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=False))
        with torch.no_grad():  # HF initializes biases to zero, which would hide a missing bias
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    elif kind == "llama3":
        model = LlamaForCausalLM(LlamaConfig(**TINY, rope_theta=500000.0,
                                             rope_scaling=LLAMA3_SCALING))
    return model.eval()


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ["qwen3_tied", "qwen3_untied", "qwen2_bias", "llama3"])
def test_logits_match_transformers(kind, tmp_path):
    reference = hf_model(kind)
    reference.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    idx = torch.randint(0, TINY["vocab_size"], (2, 41))
    with torch.no_grad():
        assert max_diff(ours(idx), reference(idx).logits) <= 1e-4


def test_sharded_checkpoint_and_hub_config_dialect(tmp_path):
    """Shards with an index, and a config.json in the hub's dialect (rope_theta + rope_scaling at
    the top level, torch_dtype) as in the released Llama-3.1-8B files."""
    reference = hf_model("llama3")
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.rope_scaling["factor"] == 8.0 and ours.config.rope_theta == 500000.0
    idx = torch.randint(0, TINY["vocab_size"], (2, 41))
    with torch.no_grad():
        assert max_diff(ours(idx), reference(idx).logits) <= 1e-4


def test_tied_checkpoint_with_redundant_head_is_tied_by_config(tmp_path):
    reference = hf_model("qwen3_tied")
    reference.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.embed_tokens.weight


def test_llama3_rope_inverse_frequencies_match_transformers():
    config = LlamaConfig(**TINY, head_dim=32, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    ours = ModelConfig(model_type="llama", head_dim=32, rope_theta=500000.0,
                       rope_scaling={k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"})
    reference = LlamaRotaryEmbedding(config).inv_freq
    # The scaling bites: the frequencies differ from unscaled RoPE's.
    assert not torch.equal(reference, 1.0 / (500000.0 ** (torch.arange(0, 32, 2).float() / 32)))
    assert torch.allclose(rope_inverse_frequencies(ours), reference, rtol=1e-6, atol=0)


FAMILY_CONFIGS = {
    "qwen3": ModelConfig(**TINY, head_dim=32, tie_word_embeddings=True),
    "qwen2": ModelConfig(**{**TINY, "model_type": "qwen2"}, head_dim=16, tie_word_embeddings=False),
    "llama": ModelConfig(**{**TINY, "model_type": "llama"}, head_dim=16, tie_word_embeddings=False,
                         rope_theta=5e5, rope_scaling={k: v for k, v in LLAMA3_SCALING.items()
                                                       if k != "rope_type"}),
}


@pytest.mark.parametrize("config", FAMILY_CONFIGS.values(), ids=FAMILY_CONFIGS)
@pytest.mark.parametrize("max_shard_bytes", [2**30, 30_000], ids=["single", "sharded"])
def test_export_round_trip(config, max_shard_bytes, tmp_path):
    torch.manual_seed(0)
    ours = Transformer(config)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    ours.save_pretrained(tmp_path, max_shard_bytes=max_shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_bytes < 2**30)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reloaded = Transformer.from_pretrained(tmp_path)
    idx = torch.randint(0, TINY["vocab_size"], (2, 33))
    with torch.no_grad():
        logits = ours(idx)
        assert max_diff(reference(idx).logits, logits) <= 1e-4
        assert torch.equal(reloaded(idx), logits)
    assert "fill_embedding" not in json.dumps(ours.hf_config())


def test_export_replaces_an_earlier_sharded_save(tmp_path):
    ours = Transformer(ModelConfig(**TINY, head_dim=32))
    ours.save_pretrained(tmp_path, max_shard_bytes=30_000)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    Transformer.from_pretrained(tmp_path)


CONFIG_JSON_SHA256 = {"qwen3": "f3f9e3c8a4eabc2a6705c86874c0a3b31cf5f4c6bbb8cc84dadf05714cf02096",
                      "qwen2": "6aa3172ffa4549fed7d7bcb9e18c011eccfac1387fde23fc92cd9e0ab4a148ad",
                      "llama": "2fc6824ff440727f9344a105763a09a9661ddfa30c191050ccb166bd358dfbcf"}


@pytest.mark.parametrize("family", CONFIG_JSON_SHA256)
def test_config_json_is_written_byte_for_byte_as_before(family, tmp_path):
    """The entropy cache is keyed by the bytes of the base model's config.json
    (entropy.checkpoint_fingerprint), so an export must keep writing exactly the same file."""
    Transformer(FAMILY_CONFIGS[family]).save_pretrained(tmp_path)
    digest = hashlib.sha256((tmp_path / "config.json").read_bytes()).hexdigest()
    assert digest == CONFIG_JSON_SHA256[family]


def test_attention_features_follow_the_family():
    expected = {"qwen3": dict(attention_bias=False, qk_norm=True),
                "qwen2": dict(attention_bias=True, qk_norm=False),
                "llama": dict(attention_bias=False, qk_norm=False)}
    hub_configs = {"qwen3": Qwen3Config(**TINY), "qwen2": Qwen2Config(**TINY),
                   "llama": LlamaConfig(**TINY)}
    for family, hub_config in hub_configs.items():
        read = config_from_hf(hub_config.to_dict(), "config.json")
        assert dict(attention_bias=read.attention_bias, qk_norm=read.qk_norm) == expected[family]
        default = ModelConfig(model_type=family)
        flags = dict(attention_bias=default.attention_bias, qk_norm=default.qk_norm)
        assert flags == expected[family]
    for name, config in MODEL_SIZES.items():
        flags = dict(attention_bias=config.attention_bias, qk_norm=config.qk_norm)
        assert flags == expected[config.model_type], name
    # Qwen2 has q/k/v biases whatever its attention_bias key says.
    qwen2 = {**Qwen2Config(**TINY).to_dict(), "attention_bias": False}
    assert config_from_hf(qwen2, "config.json").attention_bias


def test_attention_reads_the_flags_and_export_refuses_what_config_json_cannot_say():
    config = ModelConfig(**{**TINY, "model_type": "llama"}, attention_bias=True, qk_norm=True)
    model = Transformer(config)
    attention = model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.v_proj.bias is not None
    assert attention.o_proj.bias is None and hasattr(attention, "q_norm")
    with pytest.raises(ValueError, match="a llama config.json cannot express"):
        model.hf_config()


def test_kv_cache_generation_equals_full_recompute():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, head_dim=32)).eval()
    prompt = torch.randint(0, TINY["vocab_size"], (3, 9))
    cached = model.generate(prompt, max_new_tokens=20)
    idx = prompt
    with torch.no_grad():
        for _ in range(20):
            idx = torch.cat((idx, model(idx)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached, idx)


def test_generation_stops_at_eos_and_pads_finished_rows():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, head_dim=32)).eval()
    prompt = torch.randint(0, TINY["vocab_size"], (2, 5))
    free = model.generate(prompt, max_new_tokens=12)
    eos = free[0, 7].item()  # the third generated token of row 0 becomes the end
    out = model.generate(prompt, max_new_tokens=12, eos_id=eos)
    assert torch.equal(out[0, :8], free[0, :8])
    assert (out[0, 8:] == eos).all()
    sampled = model.generate(prompt, 12, temperature=1.0,
                             generator=torch.Generator().manual_seed(1))
    assert sampled.shape == (2, 17)


def test_left_padded_rows_generate_what_each_row_generates_alone():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, head_dim=32)).eval()
    prompts = [torch.randint(0, TINY["vocab_size"], (n,)) for n in (3, 11, 7)]
    width = max(len(p) for p in prompts)
    pad_lengths = torch.tensor([width - len(p) for p in prompts])
    idx = torch.stack([torch.cat((torch.zeros(width - len(p), dtype=torch.long), p))
                       for p in prompts])
    batched = model.generate(idx, max_new_tokens=15, pad_lengths=pad_lengths)[:, width:]
    with torch.no_grad():
        hidden = model.body(idx, pad_lengths=pad_lengths)
    for row, prompt in enumerate(prompts):
        alone_ids = model.generate(prompt[None], max_new_tokens=15)[0, len(prompt):]
        assert torch.equal(batched[row], alone_ids)
        with torch.no_grad():
            alone = model.body(prompt[None])[0]
        assert (hidden[row, pad_lengths[row]:] - alone).abs().max() <= 1e-5
    # finished_rows ends a row early (a stop sequence, say); ended rows are padded with eos_id
    stopped = model.generate(idx, max_new_tokens=15, eos_id=0, pad_lengths=pad_lengths,
                             finished_rows=lambda new: torch.tensor(
                                 [len(r) >= 4 and i == 1 for i, r in enumerate(new)]))
    assert torch.equal(stopped[1, width:width + 4], batched[1, :4])
    assert (stopped[1, width + 4:] == 0).all()


@pytest.mark.parametrize("with_entropy", [False, True])
def test_fused_loss_matches_cross_entropy_in_chunks(with_entropy):
    """The loss and its gradients, and the entropy by-product (train.py's online scores), against a
    brute-force softmax over the whole logits."""
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    loss, entropy = LinearCrossEntropy.apply(hidden, weight, targets, 7, with_entropy)  # 8 chunks, the last short
    (2.5 * loss).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    reference = F.cross_entropy(logits, targets)
    (2.5 * reference).backward()
    assert abs(loss.item() - reference.item()) <= 1e-5
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6)
    assert torch.allclose(grads[1], weight.grad, atol=1e-6)
    if with_entropy:
        p = torch.softmax(logits.detach().double(), dim=-1)
        assert (entropy.double() - -(p * p.log()).sum(-1)).abs().max() <= 1e-5
    else:
        assert entropy is None


def test_training_loss_and_gradients_match_transformers(tmp_path):
    reference = hf_model("qwen3_tied")
    reference.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    idx, targets = torch.randint(0, 300, (2, 3, 40)).unbind(0)
    _, loss = ours(idx, targets)
    loss.backward()
    expected = F.cross_entropy(reference(idx).logits.flatten(0, 1), targets.flatten())
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5
    ours_grads = {Transformer.hf_name(n): p.grad for n, p in ours.named_parameters()}
    for name, p in reference.named_parameters():
        assert torch.allclose(ours_grads[name], p.grad, atol=1e-5), name


def tiny_model_and_batch():
    """A random tiny model, two rows of inputs and targets, and a fill mask over 30% of
    positions."""
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 300, (2, 2, 40)).unbind(0)
    return Transformer(ModelConfig(**TINY)), idx, targets, torch.rand(2, 40) < 0.3


def training_step(model, idx, targets, fill_mask):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets, fill_mask=fill_mask)
    loss.backward()
    # a compiled model names its parameters "_orig_mod.<name>"
    return loss.item(), {name.removeprefix("_orig_mod."): p.grad.clone()
                         for name, p in model.named_parameters()}


def test_training_step_compiles_to_one_graph_with_the_same_gradients():
    model, idx, targets, fill_mask = tiny_model_and_batch()
    explanation = torch._dynamo.explain(model)(idx, targets, fill_mask=fill_mask)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), \
        explanation.break_reasons
    eager_loss, eager_grads = training_step(model, idx, targets, fill_mask)
    # aot_eager traces forward and backward as torch.compile does (the fused loss included), without
    # the C++ code generation that would take most of a minute here.
    compiled_loss, compiled_grads = training_step(torch.compile(model, backend="aot_eager"), idx,
                                                  targets, fill_mask)
    assert abs(compiled_loss - eager_loss) <= 1e-6
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, atol=1e-6), name


def test_bfloat16_autocast_step_stays_close_to_float32():
    model, idx, targets, fill_mask = tiny_model_and_batch()
    full_loss, full_grads = training_step(model, idx, targets, fill_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half_loss, half_grads = training_step(model, idx, targets, fill_mask)
    assert abs(half_loss - full_loss) <= 0.01 * full_loss
    for name, grad in full_grads.items():
        assert half_grads[name].dtype == torch.float32, name  # fp32 weights keep fp32 gradients
        assert (half_grads[name] - grad).norm() <= 0.05 * grad.norm() + 1e-6, name


# ---- bad input: each error names what is wrong ---------------------------------------------

@pytest.fixture
def saved(tmp_path):
    hf_model("qwen3_untied").save_pretrained(tmp_path)
    return tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Transformer.from_pretrained(tmp_path / "nowhere")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(saved)


def test_unsupported_model_type(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2'.*qwen3, qwen2, llama"):
        Transformer.from_pretrained(saved)


def test_missing_tensor(saved):
    from safetensors.torch import load_file, save_file
    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        Transformer.from_pretrained(saved)


def test_wrong_shape(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ValueError,
                       match=r"mlp.gate_proj.weight has shape \(96, 64\), expected \(128, 64\)"):
        Transformer.from_pretrained(saved)


def test_truncated_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        Transformer.from_pretrained(saved)


def test_corrupt_index(tmp_path):
    hf_model("qwen3_untied").save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm')
    with pytest.raises(ValueError, match="model.safetensors.index.json is not valid JSON"):
        Transformer.from_pretrained(tmp_path)
