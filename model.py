"""
A hand-written decoder-only transformer that loads and saves Hugging Face checkpoints of
Qwen3, Qwen2/Qwen2.5 and Llama 3.x.

Architecture, shared by the three families:
- pre-norm blocks: x + attn(RMSNorm(x)), then x + mlp(RMSNorm(x)); RMSNorm is computed in fp32
- rotary position embeddings in the split-halves layout (HF's rotate_half), so HF's q/k
  weights load as they are, with no permutation
- grouped-query attention through F.scaled_dot_product_attention
- SwiGLU MLP: down(silu(gate(x)) * up(x)); no biases anywhere except as noted below
Per family:
- qwen3: RMSNorm over head_dim on each query and key head, before RoPE; head_dim is its own key
- qwen2: biases on the q, k and v projections (Qwen2 and Qwen2.5)
- llama: "llama3" rope_scaling of the inverse frequencies (Llama 3.1 / 3.2)
Modules carry Hugging Face's names, so a checkpoint maps onto them one to one.

For EntroDrop the model takes one extra input: a boolean mask of input positions whose
embedding is replaced by a fixed fill vector (Eq. 1). It knows nothing else of the method.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")


@dataclass
class ModelConfig:
    model_type: str = "qwen3"           # "qwen3", "qwen2" (Qwen2, Qwen2.5) or "llama" (Llama 3.x)
    attention_bias: bool | None = None  # biases on the q, k and v projections (Qwen2);
                                        # None: the family's
    qk_norm: bool | None = None         # RMSNorm over head_dim on each query and key head
                                        # (Qwen3); likewise
    vocab_size: int = 151936            # rows of the embedding matrix (may exceed the
                                        # tokenizer's ids)
    hidden_size: int = 1024             # d, the width of the residual stream
    intermediate_size: int = 3072       # inner width of the SwiGLU MLP
    num_hidden_layers: int = 28         # number of transformer blocks
    num_attention_heads: int = 16       # query heads
    num_key_value_heads: int = 8        # key/value heads; fewer than query heads =
                                        # grouped-query attention
    head_dim: int = 128                 # width of one head; Qwen3 sets it apart from
                                        # hidden_size / heads
    max_position_embeddings: int = 40960  # longest sequence the checkpoint was trained for
    rope_theta: float = 1e6             # RoPE base: 1e6 for Qwen, 5e5 for Llama 3
    rope_scaling: dict | None = None    # Llama 3.1/3.2: the "llama3" factors (LLAMA3_ROPE_KEYS);
                                        # else None
    rms_norm_eps: float = 1e-6          # 1e-6 for Qwen, 1e-5 for Llama 3
    tie_word_embeddings: bool = True    # the output head reuses the input embedding matrix
    bos_token_id: int | None = None     # carried through to the exported config.json
    eos_token_id: int | list | None = None  # likewise
    dropout: float = 0.0                # hidden dropout on attention weights and both residual
                                        # branches

    # The attention of each family. model_type decides both flags when reading a config.json: it
    # has no qk_norm key, and its attention_bias is not ours (HF's Qwen3 and Llama would bias o_proj
    # too, so it must be false there; Qwen2 has q/k/v biases whatever it says).
    ATTENTION_BY_FAMILY = {"qwen3": dict(attention_bias=False, qk_norm=True),
                           "qwen2": dict(attention_bias=True, qk_norm=False),
                           "llama": dict(attention_bias=False, qk_norm=False)}

    def __post_init__(self):
        # A flag left out takes its family's value, so a config written with model_type alone
        # (a preset's scratch_model, a test's) builds the family's attention; an unknown
        # model_type, refused on loading and saving, gets neither.
        family = self.ATTENTION_BY_FAMILY.get(self.model_type,
                                              dict(attention_bias=False, qk_norm=False))
        for flag, value in family.items():
            if getattr(self, flag) is None:
                setattr(self, flag, value)


_QWEN3 = dict(model_type="qwen3", attention_bias=False, qk_norm=True, vocab_size=151936,
              head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960,
              num_key_value_heads=8)
_QWEN25 = dict(model_type="qwen2", attention_bias=True, qk_norm=False, vocab_size=151936,
               rope_theta=1e6, rms_norm_eps=1e-6, num_key_value_heads=2)
_LLAMA3 = dict(model_type="llama", attention_bias=False, qk_norm=False, vocab_size=128256,
               rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
               num_key_value_heads=8, head_dim=128)
_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
_SMOLLM2 = dict(model_type="llama", attention_bias=False, qk_norm=False, vocab_size=49152,
                rope_theta=1e5, rms_norm_eps=1e-5, max_position_embeddings=8192,
                num_key_value_heads=3, head_dim=64)

# The released shapes, for benchmarks and for checking a config.json by eye.
MODEL_SIZES = {name: ModelConfig(**{**family, **extra}, hidden_size=d, intermediate_size=ffn,
                                 num_hidden_layers=layers, num_attention_heads=heads,
                                 tie_word_embeddings=tied)
               for name, family, d, ffn, layers, heads, tied, extra in (
    #                d      ffn    layers heads  tied
    ("Qwen3-0.6B",   _QWEN3,  1024,  3072, 28, 16, True,  {}),
    ("Qwen3-1.7B",   _QWEN3,  2048,  6144, 28, 16, True,  {}),
    ("Qwen3-8B",     _QWEN3,  4096, 12288, 36, 32, False, {}),
    ("Qwen2.5-0.5B", _QWEN25,  896,  4864, 24, 14, True,  dict(head_dim=64,
                                                               max_position_embeddings=32768)),
    ("Qwen2.5-1.5B", _QWEN25, 1536,  8960, 28, 12, True,  dict(head_dim=128,
                                                               max_position_embeddings=131072)),
    ("Llama-3.1-8B", _LLAMA3, 4096, 14336, 32, 32, False, dict(rope_scaling=dict(factor=8.0,
                                                                                 **_LLAMA3_ROPE))),
    ("Llama-3.2-1B", _LLAMA3, 2048,  8192, 16, 32, True,  dict(head_dim=64,
                                                               rope_scaling=dict(factor=32.0,
                                                                                 **_LLAMA3_ROPE))),
    ("Llama-3.2-3B", _LLAMA3, 3072,  8192, 28, 24, True,  dict(rope_scaling=dict(factor=32.0,
                                                                                 **_LLAMA3_ROPE))),
    ("SmolLM2-135M", _SMOLLM2,  576,  1536, 30,  9, True,  {}),
)}


def config_from_hf(hf: dict, source: str) -> ModelConfig:
    """Read a config.json in either dialect: the hub's (`rope_theta` and `rope_scaling` at the top
    level, `torch_dtype`) or what transformers >= 5 writes (`rope_parameters`, `dtype`)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; "
                         f"this loader reads {', '.join(SUPPORTED_MODEL_TYPES)} "
                         "(Qwen3, Qwen2/Qwen2.5, Llama 3.x)")
    for key, allowed in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                         ("use_sliding_window", False)):
        # Qwen2 always has q/k/v biases, whatever attention_bias says; the others must have none.
        if key in hf and hf[key] != allowed and not (key == "attention_bias"
                                                     and model_type == "qwen2"):
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (expected {allowed!r})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"{source}: missing required key(s) {missing}")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported "
                         "(expected 'default' or 'llama3')")
    if rope_type == "llama3" and any(k not in scaling for k in LLAMA3_ROPE_KEYS):
        raise ValueError(f"{source}: llama3 rope scaling needs the keys {LLAMA3_ROPE_KEYS}")
    known = {f.name for f in fields(ModelConfig)} - {"rope_theta", "rope_scaling", "dropout",
                                                     "attention_bias", "qk_norm"}
    config = ModelConfig(**{k: hf[k] for k in known if k in hf and hf[k] is not None},
                         **ModelConfig.ATTENTION_BY_FAMILY[model_type])
    config.rope_theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
    config.rope_scaling = ({k: scaling[k] for k in LLAMA3_ROPE_KEYS} if rope_type == "llama3"
                           else None)
    config.num_key_value_heads = hf.get("num_key_value_heads") or config.num_attention_heads
    config.head_dim = hf.get("head_dim") or config.hidden_size // config.num_attention_heads
    # HF's default for all three
    config.tie_word_embeddings = bool(hf.get("tie_word_embeddings", False))
    return config


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """(head_dim // 2,) rotation speeds theta^(-2i/d), with Llama 3's rescaling of the slow ones."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta
                      ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
    if config.rope_scaling is None:
        return inv_freq
    # "llama3": wavelengths beyond the original context are stretched by `factor`, short ones are
    # kept, and the band in between is interpolated smoothly.
    s = config.rope_scaling
    context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / s["low_freq_factor"], inv_freq / s["factor"], inv_freq)
    smooth = ((context / wavelen - s["low_freq_factor"])
              / (s["high_freq_factor"] - s["low_freq_factor"]))
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = ((wavelen >= context / s["high_freq_factor"])
              & (wavelen <= context / s["low_freq_factor"]))
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """x (B, T, heads, head_dim); cos, sin (B or 1, T, 1, head_dim), broadcast over heads.
    Split-halves rotation (HF's rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalize in fp32, cast back, then scale: HF's order, so results agree in every dtype.
        # F.rms_norm is one fused op for x * rsqrt(mean(x^2) + eps).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class KVCache:
    """Keys and values of the positions seen so far, for one layer during generation."""

    def __init__(self, max_len):
        self.max_len, self.length, self.k, self.v = max_len, 0, None, None

    def update(self, k, v):
        """k, v (B, n_kv_head, T, head_dim) of new positions -> all keys and values so far."""
        if self.k is None:  # allocated on first use, in whatever dtype autocast produced
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads,
                                                      config.num_key_value_heads, hd)
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=False)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)  # one weight shared by all heads
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None, mask=None):
        """mask (B, 1, T, keys) bool, True where a query may attend: only for left-padded rows."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)     # (B, T, n_head, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, n_kv_head, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(k, v)
        # Training and prompts are causal; one new token attends to everything cached before it.
        # (`cache is None` first: a plain bool even when torch.compile traces T as a symbol.)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=mask is None and (cache is None or T > 1),
                                           enable_gqa=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, mask))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


def chunk_softmax(logits, targets, probs_out=None):
    """The numerically safe softmax of one chunk of the output head, shared by the fused loss and
    the entropy pass. logits (n, vocab) float32, shifted in place by each row's peak;
    targets (n,) -> probs (n, vocab) = softmax x total, written into probs_out, or over the logits
    themselves when there is none; total (n, 1); nll (n,) = log-sum-exp minus the target's logit;
    and, when probs_out left the shifted logits to spare, the entropy (n,) in nats (else None)."""
    target_logit = logits.gather(1, targets[:, None])                         # (n, 1)
    peak = logits.amax(dim=-1, keepdim=True)                                  # (n, 1)
    shifted = logits.sub_(peak)                                               # log(softmax x total)
    probs = torch.exp(shifted, out=probs_out) if probs_out is not None else shifted.exp_()
    total = probs.sum(dim=-1, keepdim=True)                                   # (n, 1)
    nll = (peak + total.log() - target_logit).squeeze(1)                      # log-sum-exp - target
    entropy = None
    if probs_out is not None:
        # With p = probs / total, log p = shifted - log(total):
        # H = log(total) - sum(probs shifted) / total. The shifted logits stand in for log p (no
        # log per vocabulary entry, the costliest step on a CPU), and are used up by the product,
        # in place, leaving probs as they are.
        entropy = (total.log() - shifted.mul_(probs).sum(dim=-1, keepdim=True) / total).squeeze(1)
    return probs, total, nll, entropy


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T against targets, in chunks of rows, so that the
    (N, vocab) logits never exist whole: at Qwen's 151,936-token vocabulary they would be 2.5 GB
    per 4,096 fp32 tokens. The gradient of cross-entropy is softmax - onehot, so each chunk's
    gradients are formed right away and the logits are never stored or recomputed.
    With with_entropy, each position's entropy under the current weights comes out too (N,), at
    the cost of a dot product per row (train.py's online scores); otherwise None. H = log-sum-exp
    minus the softmax's mean logit, and that mean is h . (p @ weight), where p @ weight is a term
    of the gradient of h, computed anyway: (p - onehot) @ weight. So
    H = nll - h . (dlogits @ weight), with no second pass over the (n, vocab) probabilities."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, with_entropy):
        # hidden (N, d), weight (vocab, d), targets (N,); `rows` per chunk
        N = hidden.shape[0]
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if with_entropy and not want_grad:
            raise ValueError("with_entropy comes from the gradient's terms: "
                             "call it with gradients enabled")
        entropy = torch.empty(N, device=hidden.device) if with_entropy else None
        for start in range(0, N, rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = h @ weight.T                                         # (n, vocab)
            matmul_dtype = logits.dtype                                   # bf16 under autocast
            probs, total, nll, _ = chunk_softmax(logits.float(), t)
            loss += nll.sum()
            if want_grad:
                dlogits = probs.div_(total)                               # softmax
                dlogits[torch.arange(len(t), device=t.device), t] -= 1.0  # minus onehot
                dlogits = dlogits.to(matmul_dtype)  # once here, not by autocast per matmul below
                grad_h = dlogits @ weight                                 # (n, d)
                if with_entropy:
                    entropy[start:start + rows] = nll - (h.float() * grad_h.float()).sum(dim=-1)
                grad_hidden[start:start + rows] = grad_h / N
                # 1/N on the small factor, not on (vocab, d). Later chunks' products go unnamed, so
                # each is freed once added; add_ widens a bf16 one to fp32 exactly, as .float() does
                if grad_weight is None:
                    grad_weight = (dlogits.T @ (h / N)).float()           # (vocab, d) fp32
                else:
                    grad_weight.add_(dlogits.T @ (h / N))
        # results, not inputs: on ctx
        ctx.grads, ctx.weight_dtype = (grad_hidden, grad_weight), weight.dtype
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
        return loss / N, entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # freed as soon as autograd is done with them
        # In place, since a fresh (vocab, d) tensor costs a page fault per 4 KB on a CPU.
        return (grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss).to(ctx.weight_dtype),
                None, None, None)


@torch.no_grad()
def head_statistics(hidden, weight, targets, rows):
    """Per-position entropy of the next-token distribution and loss of the actual next token, in
    nats, without the (N, vocab) logits: hidden (N, d), weight (vocab, d), targets (N,) ->
    entropy (N,), nll (N,), float32. Two (rows, vocab) buffers serve every chunk (on a CPU a fresh
    one costs a page fault per 4 KB)."""
    entropy = torch.empty(len(hidden), device=hidden.device)
    nll = torch.empty(len(hidden), device=hidden.device)
    logits_buffer = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=hidden.device)
    probs_buffer = torch.empty(rows, weight.shape[0], device=hidden.device)
    for start in range(0, len(hidden), rows):
        h = hidden[start:start + rows]
        logits = torch.matmul(h, weight.T, out=logits_buffer[:len(h)]).float()  # copy only if bf16
        _, _, nll[start:start + rows], entropy[start:start + rows] = chunk_softmax(
            logits, targets[start:start + rows], probs_buffer[:len(h)])
    return entropy, nll


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        # Eq. (1): masked input positions get e_bar, the mean of the BASE model's input
        # embedding matrix. Computed once from the weights this model starts from, then frozen;
        # saved in training checkpoints, never exported as a weight (Appendix A.3).
        self.register_buffer("fill_embedding", torch.zeros(config.hidden_size))
        # Recompute each block in backward instead of keeping its activations (train.py's
        # --activation_checkpointing): a block's input is all that is kept, at the cost of a
        # second forward.
        self.activation_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Random weights for training from scratch: N(0, 0.02) matrices, zero biases, unit
        norms."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        self.fill_embedding.copy_(self.embed_tokens.weight.float().mean(dim=0))

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per matmul weight plus attention (PaLM, appendix B)."""
        c = self.config
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return (6 * matmul_params
                + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len)

    def body(self, idx, fill_mask=None, embedding_noise=None, caches=None, pad_lengths=None):
        """idx (B, T) -> final-normed hidden states (B, T, d), before the output head.
        fill_mask (B, T) bool: positions whose input embedding becomes fill_embedding (Eq. 1).
        embedding_noise (B, T, d): added to the input embeddings (NEFTune).
        pad_lengths (B,) long, for generation from prompts of different lengths: each row begins
        with that many padding tokens, which nothing attends to, and its positions count from its
        first real token, so a padded row computes what it would alone."""
        # Tied weights: the embedding's gradient is sparse (B*T rows), not a zero-filled (vocab, d)
        # tensor that is then added whole (a sixth of a CPU step at vocab 151,936). The head's dense
        # gradient arrives first, so autograd adds the sparse one to it out of place: two (vocab, d)
        # gradients exist at once at the end of backward, as they would with a dense one.
        x = F.embedding(idx, self.embed_tokens.weight,
                        sparse=self.config.tie_word_embeddings)  # (B, T, d)
        if fill_mask is not None:
            x = torch.where(fill_mask[..., None], self.fill_embedding.to(x.dtype), x)  # Eq. (1)
        if embedding_noise is not None:
            x = x + embedding_noise
        start = caches[0].length if caches else 0
        slots = torch.arange(start, start + idx.shape[1], device=idx.device)  # (T,) places in row
        positions, mask = slots[None], None                                    # (1, T)
        if pad_lengths is not None:
            positions = (slots[None] - pad_lengths[:, None]).clamp(min=0)     # (B, T)
            keys = torch.arange(start + idx.shape[1], device=idx.device)      # (keys,)
            # (B, 1, T, keys): causal, and no query sees padding, except a padding slot itself (a
            # query that may attend to nothing gives NaN, which would spread through the cache).
            mask = (keys <= slots[:, None]) & ((keys >= pad_lengths[:, None, None])
                                               | (keys == slots[:, None]))
            mask = mask[:, None]
        freqs = positions[..., None].float() * self.inv_freq  # (B or 1, T, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # (B or 1, T, 1, head_dim),
                                                                # split halves
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, caches[i] if caches else None, mask)
        return self.norm(x)

    def forward(self, idx, targets=None, fill_mask=None, embedding_noise=None, per_token=False,
                caches=None, pad_lengths=None, with_entropy=False):
        """idx (B, T) ->
        - logits (B, T, vocab);
        - with targets (B, T): (None, mean cross-entropy), the loss fused with the output head, so
          training never materializes the full logits (see LinearCrossEntropy); with_entropy (in
          training): the entropy of every position's next-token distribution (B, T) in place of
          None;
        - with targets and per_token: (entropy, nll), each (B, T) float32: the next-token
          distribution's entropy and the actual target's loss at every position (head_statistics);
        - with caches (generation, see body): the logits of the last position only, (B, vocab).
        Everything goes through here, the evaluation and the entropy pass too, so that the hooks
        of a wrapped model (FSDP's gathering of the weights) always run."""
        hidden = self.body(idx, fill_mask, embedding_noise, caches, pad_lengths)
        if caches is not None:
            return self.lm_head(hidden[:, -1])
        if targets is None:
            return self.lm_head(hidden)
        flat, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if per_token:
            # Under autocast the head's weight is cast once here, not by autocast in every chunk.
            device = idx.device.type
            head = self.lm_head.weight
            if torch.is_autocast_enabled(device):
                head = head.to(torch.get_autocast_dtype(device))
            entropy, nll = head_statistics(flat.to(head.dtype), head, targets,
                                           self.head_chunk_rows(len(flat), 2))
            return entropy.view(idx.shape), nll.view(idx.shape)
        loss, entropy = LinearCrossEntropy.apply(flat, self.lm_head.weight, targets,
                                                 self.head_chunk_rows(len(flat)), with_entropy)
        return (entropy.view(idx.shape) if with_entropy else None), loss

    def head_chunk_rows(self, n_rows, buffers=1):
        """Rows per chunk when the output head runs over n_rows positions: at most 512 MB in all
        for `buffers` fp32 (rows, vocab) tensors at a time, in equal chunks (a short last chunk
        would run its matmul slowly)."""
        max_rows = max(1, 2**27 // (buffers * self.config.vocab_size))
        return -(-n_rows // -(-n_rows // max_rows))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, eos_id=None, generator=None,
                 pad_lengths=None, finished_rows=None):
        """Extend idx (B, T) by up to max_new_tokens, greedily (temperature 0) or by sampling,
        with a KV cache. Prompts of different lengths are left-padded, with pad_lengths (B,)
        saying by how much (see body). A row ends when it emits eos_id, or when finished_rows,
        given the (B, t) tokens generated so far, says so (a stop sequence in its text); ended
        rows are padded with eos_id, and generation stops when all have ended.
        Call model.eval() first so that dropout is off."""
        caches = [KVCache(idx.shape[1] + max_new_tokens) for _ in self.layers]
        logits = self(idx, caches=caches, pad_lengths=pad_lengths)  # (B, vocab)
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        prompt_length = idx.shape[1]
        for _ in range(max_new_tokens):
            if temperature == 0.0:
                next_id = logits.argmax(dim=-1)
            else:
                probs = F.softmax(logits.float() / temperature, dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            if eos_id is not None:
                next_id = torch.where(finished, eos_id, next_id)
                finished |= next_id == eos_id
            idx = torch.cat((idx, next_id[:, None]), dim=1)
            if finished_rows is not None:
                finished |= finished_rows(idx[:, prompt_length:]).to(finished.device)
            if finished.all():
                break
            logits = self(next_id[:, None], caches=caches, pad_lengths=pad_lengths)
        return idx

    # ---- Hugging Face checkpoints ----------------------------------------------------------

    @staticmethod
    def hf_name(name):
        """Our parameter name -> the checkpoint's: everything but the head lives under "model."."""
        return name if name.startswith("lm_head.") else "model." + name

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", dropout=0.0):
        """Load a HF folder: config.json plus model.safetensors or the shards of
        model.safetensors.index.json. Checks every tensor's presence and shape.
        dropout: hidden dropout for training (checkpoints do not carry one)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        config = config_from_hf(_read_json(folder / "config.json"), str(folder / "config.json"))
        config.dropout = dropout
        with torch.device("meta"):  # no memory is spent on weights that are about to be replaced
            model = cls(config)
        checkpoint = _read_safetensors(folder, str(device))
        # tied: one shared weight
        expected = {cls.hf_name(n): p.shape for n, p in model.named_parameters()}
        missing = sorted(expected.keys() - checkpoint.keys())
        # A tied checkpoint may still carry lm_head.weight: tying follows the config, not the file.
        redundant = {"lm_head.weight"} if config.tie_word_embeddings else set()
        unexpected = sorted(checkpoint.keys() - expected.keys() - redundant)
        if missing or unexpected:
            raise ValueError(f"{folder}: tensors do not match a {config.model_type} model with "
                             f"this config.json: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, shape in expected.items():
            if checkpoint[name].shape != shape:
                raise ValueError(f"{folder}: tensor {name} has shape "
                                 f"{tuple(checkpoint[name].shape)}, "
                                 f"expected {tuple(shape)} from config.json")
        state = {n: checkpoint[cls.hf_name(n)].to(dtype=dtype) for n, _ in model.named_parameters()}
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:  # assign=True replaced the shared Parameter: tie again
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inverse_frequencies(config).to(device)
        model.fill_embedding = model.embed_tokens.weight.detach().float().mean(dim=0)
        return model

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30, weights=None):
        """Write config.json and safetensors (sharded above max_shard_bytes, with an index) that
        transformers, vLLM, lm-eval and OpenCompass load. Each file is written to a temporary
        name and renamed, so an interrupted save never leaves a half-written file.
        weights: {name: tensor} to write instead of the module's own (the full weights gathered
        from the shards of a model split across ranks)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        weights = weights if weights is not None else dict(self.named_parameters())
        tensors = {self.hf_name(n): weights[n].detach().contiguous().cpu()
                   for n, _ in self.named_parameters()}
        shards, size = [{}], 0
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name], size = tensor, size + nbytes
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            temporary = folder / f"{name}.{os.getpid()}.tmp"
            save_file(shard, str(temporary), metadata={"format": "pt"})
            replace_durably(temporary, folder / name)
        index = folder / "model.safetensors.index.json"
        if len(shards) > 1:
            weight_map = {t: name for name, shard in zip(names, shards) for t in shard}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
        keep = set(names) | ({index.name} if len(shards) > 1 else set())
        for stale in [*folder.glob("model*.safetensors"), index]:  # left over from an earlier save
            if stale.exists() and stale.name not in keep:
                stale.unlink()
        _write_json(folder / "config.json", self.hf_config())

    def hf_config(self):
        c = self.config
        flags = dict(attention_bias=c.attention_bias, qk_norm=c.qk_norm)
        if flags != ModelConfig.ATTENTION_BY_FAMILY[c.model_type]:
            raise ValueError(f"a {c.model_type} config.json cannot express {flags}; HF would build "
                             f"{ModelConfig.ATTENTION_BY_FAMILY[c.model_type]}")
        hf = {k: v for k, v in asdict(c).items()
              if k not in ("dropout", "rope_scaling", "attention_bias", "qk_norm")}
        architecture = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                        "llama": "LlamaForCausalLM"}
        hf.update(architectures=[architecture[c.model_type]], hidden_act="silu",
                  rope_scaling=(dict(rope_type="llama3", **c.rope_scaling) if c.rope_scaling
                                else None),
                  torch_dtype=str(self.embed_tokens.weight.dtype).removeprefix("torch."),
                  use_cache=True)
        if not c.attention_bias:  # Qwen2 always has q/k/v biases and no such key
            hf["attention_bias"] = False
        return hf


def _read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); "
                         "re-download or re-export the checkpoint") from None


def _write_json(path: Path, obj):
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(obj, indent=2) + "\n")
    replace_durably(temporary, path)


def make_durable(path):
    """Force a file, or every file of a folder, to disk and give it the user's umask (safetensors
    makes files private): a rename can reach the disk before the data it names."""
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        os.chmod(file, 0o666 & ~umask)
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def replace_durably(temporary, path):
    """Move a file or folder, just written whole under a temporary name (with the writer's pid in
    it, so that two writers never share one), onto path: readers and crashes then see the old
    version or the new one, never a mixture."""
    make_durable(temporary)
    os.replace(temporary, path)


def _read_safetensors(folder: Path, device: str) -> dict:
    """Every tensor of a checkpoint folder: one model.safetensors or the shards named in the
    index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object; "
                             "re-download or re-export the checkpoint")
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor "
                                "model.safetensors.index.json")
    tensors = {}
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} (named in {index.name}) does not exist")
        try:
            with safe_open(str(folder / name), framework="pt", device=device) as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # safetensors reports truncation, corruption as its own error type
            raise ValueError(f"{folder / name} is not a readable safetensors file ({e}); "
                             "it may be truncated: re-download or re-export it") from None
    return tensors
