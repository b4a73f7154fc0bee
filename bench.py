"""
Speed and memory, measured side by side in one run: our Transformer against transformers'
implementation of the same architecture with the same weights, the entropy pass against a
training step, an EntroDrop step against a baseline step, and peak memory at Qwen's vocabulary.

    python bench.py                                           # CPU, fp32: demo, Qwen3-0.6B with
                                                              # 2 layers, SmolLM2
    python bench.py --device cuda --dtype bfloat16 --compile  # GPU: the whole Qwen3-0.6B,
                                                              # 4 x 4096 tokens

Each comparison alternates the two sides after a warm-up and reports medians; a ratio is the
median of ratios of adjacent pairs, so that a machine that slows down slows both sides of a pair.
MFU is model FLOPs per second (6 per matmul weight per token, plus attention) over the device's
peak: a known GPU's datasheet bf16 figure; elsewhere (a CPU) the best measured rate of a large
matmul, taken at the start and at the end of the run (a shared machine can be slow at either
moment).
"""

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from dropout import draw_gamma, refresh_scores, token_dropout_mask
from entropy import token_entropies
from model import MODEL_SIZES, ModelConfig, Transformer
from train import peak_flops

DEMO = ModelConfig(model_type="qwen3", vocab_size=257, hidden_size=96, intermediate_size=256,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                   max_position_embeddings=1024)


def cpu_name():
    """The processor's marketing name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device):
    """Wall time of one call, with the device's queued work finished on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def paired(first, second, device, repeats):
    """Median seconds of each callable and the median of second/first over adjacent pairs."""
    for fn in (first, second, first, second):  # warm-up: allocator, kernels, compilation
        fn()
    times = ([], [])
    for r in range(repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)  # alternate who goes first
        for i in order:
            times[i].append(seconds((first, second)[i], device))
    ratio = statistics.median(b / a for a, b in zip(*times))
    return statistics.median(times[0]), statistics.median(times[1]), ratio


def matmul_peak(device, dtype, n=2048, repeats=10):
    """FLOP/s of the best of several n x n x n matmuls: the device's practical peak."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype),
            torch.randn(n, n, device=device, dtype=dtype))
    return 2 * n ** 3 / min(seconds(lambda: a @ b, device) for _ in range(repeats + 1))


def model_pair(config, device, compile_models):
    """Our model and transformers' from the same config and the same (random) weights."""
    from transformers import AutoModelForCausalLM  # a reference only, never used by the project
    torch.manual_seed(0)
    ours = Transformer(config)
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                      attn_implementation="sdpa")
    ours, theirs = ours.to(device).train(), theirs.to(device).train()
    if compile_models:
        # Forget the other size's compilation, or dynamo would retrace this one with a symbolic
        # sequence length; a training run compiles one static shape.
        torch._dynamo.reset()
        return torch.compile(ours), torch.compile(theirs), ours
    return ours, theirs, ours


def train_step(model, hf, inputs, targets, autocast, fill_mask=None):
    """Forward and backward of one batch (the optimizer is the same for both and left out)."""
    with autocast:
        # use_cache=False: no KV cache is built while training (the exported config.json enables it)
        loss = model(input_ids=inputs, labels=inputs, use_cache=False).loss if hf else \
            model(inputs, targets, fill_mask=fill_mask)[1]
    loss.backward()
    model.zero_grad(set_to_none=True)


def entrodrop_mask(scores, step, device):
    """What EntroDrop adds before the forward pass: gamma_j, the gate and the mask draws
    (Eqs. 2-3)."""
    rows = len(scores)
    gamma = draw_gamma(0, step, 0.1)
    return token_dropout_mask(scores, torch.ones(rows, dtype=torch.bool), torch.arange(rows), 0,
                              step, gamma, "low", 0.5).to(device)


def entrodrop_step(model, inputs, targets, scores, step, autocast):
    """A baseline step with EntroDrop's mask and fill."""
    train_step(model, False, inputs, targets, autocast,
               fill_mask=entrodrop_mask(scores, step, inputs.device))


def online_entrodrop_step(model, inputs, targets, scores, table, step, autocast):
    """An EntroDrop step with online scores: the entropies come out of the loss's softmax, and the
    rows' scores in the (windows, seq_len + 1) table are refreshed from them (train.py)."""
    fill_mask = entrodrop_mask(scores, step, inputs.device)
    with autocast:
        entropy, loss = model(inputs, targets, fill_mask=fill_mask, with_entropy=True)
    loss.backward()
    model.zero_grad(set_to_none=True)
    refresh_scores(table, torch.arange(len(inputs)), entropy.detach().float().cpu(),
                   fill_mask.cpu())


def entrodrop_added_work(embeddings, fill, upstream, scores, step):
    """EntroDrop's additions alone: the mask, then the fill (Eq. 1) forward and backward on
    (B, T, d) embeddings, as in Transformer.body."""
    mask = entrodrop_mask(scores, step, embeddings.device)
    torch.where(mask[..., None], fill, embeddings).backward(upstream)
    embeddings.grad = None


def median_seconds(fn, device, repeats):
    """Median seconds of one callable after a warm-up."""
    for _ in range(2):  # warm-up
        fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def block_activation_bytes(config, bf16):
    """Bytes that one Block keeps for backward per token, counted from the tensors its operations
    save (model.py): each RMSNorm its input; each Linear its input (under autocast a separate bf16
    copy per Linear); Qwen3's q/k norms their inputs; attention (flash or memory-efficient SDPA) its
    q, k, v, output and log-sum-exp, and o_proj the output's reshaped copy; the SwiGLU MLP the gate
    and up projections, the SiLU and the product. The residual stream stays fp32. This is the
    per-layer count of Korthikanti et al., 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", Sec. 4: 34 s b h bytes for a GPT layer) done for this block, where
    attention keeps no (s, s) scores."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = (config.num_attention_heads * config.head_dim,
             config.num_key_value_heads * config.head_dim)
    act = 2 if bf16 else 4                          # bytes of a matmul input or output
    norm_inputs = 2 * h * 4                         # the fp32 residual stream into the two RMSNorms
    linear_inputs = (3 + 2) * h * act if bf16 else 2 * h * act  # one copy per Linear, or one shared
    qk_norm = (q + kv) * act if config.qk_norm else 0
    # q, k, v; the output and its copy; the log-sum-exp
    attention = (q + 2 * kv) * act + 2 * q * act + config.num_attention_heads * 4
    mlp = 4 * i * act
    return norm_inputs + linear_inputs + qk_norm + attention + mlp


def state_bytes(model, ranks):
    """Bytes of the fp32 weights, gradients and AdamW's two moments, 16 per parameter (Rajbhandari
    et al., 2020, ZeRO, Sec. 3.1), on the rank that holds the most: whole with ranks=1 (DDP); split
    over ranks by FSDP, which cuts each tensor along its first dimension as torch.chunk does, so
    rank 0 holds ceil(rows / ranks) of every tensor's rows. A tied head and embedding count once."""
    return 16 * sum(-(-p.shape[0] // ranks) * p[0].numel() for p in model.parameters())


def head_bytes(config, tokens, bf16):
    """Peak bytes of the fused loss (model.LinearCrossEntropy) during the forward pass, when every
    block's activations are still held. It forms the head's weight gradient there, fp32 (vocab, d),
    as a sum over chunks of rows, and keeps it until backward. Each chunk's (vocab, d) product is
    freed once added, but its logits, their softmax and its bf16 copy stay alive until the next
    chunk rebinds their names, so the worst moment is one of two: adding a chunk's product (the sum
    so far and the product in bf16, or for the first chunk the product in bf16 and its fp32 copy;
    beside this chunk's logits in bf16, their fp32 softmax and its bf16 copy), or starting a chunk
    (the sum so far; the previous chunk's softmax and its bf16 copy beside the new logits in bf16
    and fp32). In fp32 every cast is the tensor itself. Counted for a GPU: on a CPU, add_ first
    copies a bf16 product to fp32 (4 bytes more per element). Besides, four fp32 (tokens, d)
    tensors: the hidden states, their gradient, and what the final norm saves (its input and the
    normalized input, before the weight)."""
    vocab, d = config.vocab_size, config.hidden_size
    rows = -(-tokens // -(-tokens // max(1, 2**27 // vocab)))  # model.Transformer.head_chunk_rows
    chunks = -(-tokens // rows)
    weight, logits = vocab * d, rows * vocab  # elements of the head's gradient, of a chunk's logits
    if bf16:
        adding = (4 + 2) * weight + (2 + 4 + 2) * logits
        starting = 4 * weight + (2 + 4 + 4 + 2) * logits
    else:
        adding = 4 * min(chunks, 2) * weight + 4 * logits
        starting = 4 * weight + 2 * 4 * logits
    return max(adding, starting if chunks > 1 else 0) + 4 * tokens * d * 4


def training_memory(config, seq_len, micro_batch, ranks, fsdp, activation_checkpointing,
                    bf16=True):
    """Estimated peak bytes per GPU of one training step -> (states, step): the states of
    state_bytes, held throughout, and the most that the step holds besides them at one moment, the
    largest of four:
    - the end of the forward pass: every block's activations (block_activation_bytes per token and
      layer; with activation checkpointing only each block's fp32 input) and the fused loss's
      buffers (head_bytes); under DDP autocast's bf16 copy of every matmul weight (cached from first
      use until autocast ends), under FSDP the root's gathered weights (embeddings, final norm,
      head), which it keeps from forward to backward;
    - the backward pass of the last block: the same activations, with checkpointing that block's
      recomputed ones too; under FSDP two blocks' gathered weights (the current one and the one
      prefetched), one block's gradients gathered and in fp32 for the reduce-scatter, and the head's
      gathered gradient, kept until the root's reduce-scatter at the end of backward;
    - the embedding's backward, the last, when no activations are left: with tied weights autograd
      adds the embedding's sparse gradient to the head's dense one out of place (in place only when
      the sparse one comes first), so two (vocab, d) gradients exist at once; untied, the head's
      and the embedding's dense one under FSDP, the embedding's alone under DDP (the head's is
      already in DDP's bucket);
    - under FSDP the root's reduce-scatter that follows: its gathered gradients and their fp32 copy.
    Weights are gathered in bf16 on a GPU (parallel.mixed_precision_policy). Under DDP the backward
    is given as many autocast copies as the forward: at most that. Under FSDP on a GPU the residual
    stream is bf16, as the gathered embedding is, so fewer activations than counted are kept."""
    with torch.device("meta"):  # shapes only: no memory, even for 8B
        model = Transformer(config)
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - block * config.num_hidden_layers
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = config.vocab_size * config.hidden_size
    gathered = 2 if bf16 else 4  # bytes of a weight or gradient as FSDP gathers it
    tokens = seq_len * micro_batch
    per_layer = block_activation_bytes(config, bf16) * tokens
    if activation_checkpointing:
        kept, recomputed = config.num_hidden_layers * tokens * config.hidden_size * 4, per_layer
    else:
        kept, recomputed = config.num_hidden_layers * per_layer, 0
    if fsdp:
        forward_weights = gathered * root
        backward_weights = (gathered * root + 2 * gathered * block + (gathered + 4) * block
                            + gathered * head)
        embedding_backward = gathered * root + 2 * gathered * head
        root_reduce = (gathered + 4) * root
    else:
        forward_weights = backward_weights = 2 * matmul if bf16 else 0
        embedding_backward = (2 if config.tie_word_embeddings else 1) * 4 * head
        root_reduce = 0
    step = max(forward_weights + kept + head_bytes(config, tokens, bf16),
               backward_weights + kept + recomputed, embedding_backward, root_reduce)
    return state_bytes(model, ranks if fsdp else 1), step


def resident_bytes(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from Linux's /proc."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def peak_memory_child(what, config, batch, seq_len, device, dtype, queue):
    """In a fresh process: extra peak memory (bytes) of one `what` over what was in use before
    it."""
    torch.manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    if what == "transformers":
        from transformers import AutoModelForCausalLM
        with tempfile.TemporaryDirectory() as folder:
            Transformer(config).save_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    else:
        model = Transformer(config).to(device)
        model.activation_checkpointing = what == "ours, activation checkpointing"
    inputs = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak, so that loading the model does not count
        before = resident_bytes("VmRSS")
    if what == "entropy":
        with autocast:
            token_entropies(model.eval(), inputs, return_nll=True)
    else:
        train_step(model, what == "transformers", inputs[:, :-1], inputs[:, 1:], autocast)
    if device.type == "cuda":
        queue.put(torch.cuda.max_memory_allocated(device) - before)
    else:
        queue.put(resident_bytes("VmHWM") - before)


def peak_memory(what, config, batch, seq_len, device, dtype):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=peak_memory_child,
                              args=(what, config, batch, seq_len, device, dtype, queue))
    # glibc would keep freed blocks below its mmap threshold (which grows to 32 MB) for reuse, and
    # the peak RSS would count memory that no tensor holds; with a fixed 128 KB threshold every
    # tensor of any size is mapped on its own and returned when freed. Read by the child's C
    # library at start.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    try:
        process.start()
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    result = queue.get()
    process.join()
    return result


def generation_rows(config, device, autocast, rows=8, new_tokens=24):
    """evaluate.py's greedy decoding: prompts of different lengths, left-padded into one batch,
    against the same prompts one at a time, and against transformers' generate on the same padded
    batch."""
    ours, theirs, _ = model_pair(config, device, compile_models=False)
    ours.eval(), theirs.eval()
    torch.manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,), device=device)
               for n in range(24, 24 + 6 * rows, 6)]
    width = max(len(p) for p in prompts)
    pad_lengths = torch.tensor([width - len(p) for p in prompts], device=device)
    idx = torch.stack([torch.cat((p.new_zeros(width - len(p)), p)) for p in prompts])
    attention_mask = (torch.arange(width, device=device) >= pad_lengths[:, None]).long()

    @torch.no_grad()
    def batched():
        with autocast:
            ours.generate(idx, new_tokens, pad_lengths=pad_lengths)

    @torch.no_grad()
    def one_at_a_time():
        with autocast:
            for prompt in prompts:
                ours.generate(prompt[None], new_tokens)

    @torch.no_grad()
    def transformers_batched():
        # min_new_tokens: the same number of steps, whatever the random weights emit
        with autocast:
            theirs.generate(idx, attention_mask=attention_mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    tokens = rows * new_tokens
    label = f"SmolLM2-135M shape: greedy generation, {rows} prompts x {new_tokens} new tokens"
    t_batched, t_single, ratio = paired(batched, one_at_a_time, device, repeats=3)
    found = [(f"{label}, tokens/s batched | one at a time",
              f"{tokens / t_batched:,.0f} | {tokens / t_single:,.0f}", f"{ratio:.2f}x")]
    t_batched, t_theirs, ratio = paired(batched, transformers_batched, device, repeats=5)
    found.append((f"{label}, tokens/s ours | transformers generate",
                  f"{tokens / t_batched:,.0f} | {tokens / t_theirs:,.0f}", f"{ratio:.2f}x"))
    return found


def activation_rows(config, device, dtype, batch, seq_len, layers=(2, 6)):
    """The activation formula behind the README's memory table (training_memory), checked where it
    can be: the extra peak of a training step at two depths, per added block, against the formula.
    Without checkpointing a block adds its saved activations (block_activation_bytes); with it, only
    its fp32 input (its gradients, counted among the states, replace freed activations)."""
    bf16 = dtype == torch.bfloat16
    tokens = batch * seq_len
    predicted = {"ours": block_activation_bytes(config, bf16) * tokens,
                 "ours, activation checkpointing": config.hidden_size * 4 * tokens}
    found = []
    for what, formula in predicted.items():
        shallow, deep = (peak_memory(what, replace(config, num_hidden_layers=n), batch, seq_len,
                                     device, dtype)
                         for n in layers)
        per_block = (deep - shallow) / (layers[1] - layers[0])
        found.append((f"SmolLM2-135M shape, {tokens:,} tokens: training peak per block, {what}, "
                      "measured | formula",
                      f"{per_block / 2**20:,.1f} | {formula / 2**20:,.1f} MiB",
                      f"{per_block / formula:.2f}x"))
    return found


def print_memory_table(seq_len=4096, micro_batch=1, ranks=8):
    """Per-GPU GiB (states + the step's peak beyond them = total) of a bf16 training step, from
    training_memory."""
    settings = [(f"{'FSDP' if fsdp else 'DDP'} x {ranks}{', AC' if ac else ''}", fsdp, ac)
                for fsdp in (False, True) for ac in (False, True)]
    print(f"per-GPU memory, GiB (states + the step's peak beyond them), seq {seq_len:,}, "
          f"micro-batch {micro_batch}, bf16 autocast")
    print(f"{'model':<14}" + "".join(f"{label:>22}" for label, _, _ in settings))
    for name in ("Qwen3-0.6B", "Qwen3-1.7B", "Llama-3.1-8B"):
        cells = []
        for _, fsdp, ac in settings:
            states, step = training_memory(MODEL_SIZES[name], seq_len, micro_batch, ranks, fsdp,
                                           ac)
            cells.append(f"{states / 2**30:.1f} + {step / 2**30:.1f} = "
                         f"{(states + step) / 2**30:.0f}")
        print(f"{name:<14}" + "".join(f"{cell:>22}" for cell in cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="autocast dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--layers", type=int, default=0,
                        help="Qwen3-0.6B layers (default: 2 on CPU, 28 on GPU)")
    parser.add_argument("--seq_len", type=int, default=0,
                        help="Qwen3-0.6B sequence (default: 512 on CPU, 4096 on GPU)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes and one repeat everywhere: shows only that every row runs "
                             "(gpu_check.py --dry)")
    parser.add_argument("--memory_table", action="store_true",
                        help="print the estimated per-GPU memory of the GPU presets' models "
                             "(training_memory) and exit")
    args = parser.parse_args()
    if args.memory_table:
        return print_memory_table()
    if args.smoke:
        args.layers, args.seq_len, args.repeats = 1, 64, 1
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    qwen = replace(MODEL_SIZES["Qwen3-0.6B"], num_hidden_layers=args.layers or (28 if gpu else 2))
    qwen_seq = args.seq_len or (4096 if gpu else 512)
    qwen_batch = 4 if gpu else 1  # on a GPU, the presets' micro-batch of 4 sequences
    name = torch.cuda.get_device_name(device) if gpu else cpu_name()
    print(f"device: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.dtype}, compile={args.compile}")
    datasheet_peak = peak_flops(device) if dtype == torch.bfloat16 else None
    peak = datasheet_peak or matmul_peak(device, dtype)

    rows = []
    # (label, config, rows, tokens per row, every row of the table or only the speed against
    # transformers)
    smol = (replace(MODEL_SIZES["SmolLM2-135M"], num_hidden_layers=2) if args.smoke
            else MODEL_SIZES["SmolLM2-135M"])
    sizes = (("demo (0.33M, vocab 257)", DEMO, *((2, 64) if args.smoke else (10, 256)), True),
             (f"Qwen3-0.6B shape, {qwen.num_hidden_layers} layers", qwen, qwen_batch, qwen_seq,
              True),
             (f"SmolLM2-135M shape, {smol.num_hidden_layers} layers (the real model of make real)",
              smol, *((1, 32) if args.smoke else (8, 2048) if gpu else (4, 256)), False))
    for label, config, batch, seq_len, every_row in sizes:
        ours, theirs, raw = model_pair(config, device, args.compile)
        window = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
        inputs, targets = window[:, :-1], window[:, 1:]
        tokens = batch * seq_len
        flops = raw.flops_per_token(seq_len) * tokens
        t_ours, t_hf, ratio = paired(lambda: train_step(ours, False, inputs, targets, autocast),
                                     lambda: train_step(theirs, True, inputs, targets, autocast),
                                     device, args.repeats)
        rows.append((f"{label}: fwd+bwd tokens/s, ours | transformers",
                     f"{tokens / t_ours:,.0f} | {tokens / t_hf:,.0f}", f"{ratio:.2f}x"))
        # FLOP/s, divided by the peak below
        rows.append((f"{label}: MFU, ours | transformers", (flops / t_ours, flops / t_hf), ""))
        if not every_row:
            del ours, theirs, raw
            continue

        def entropy_pass():
            with torch.no_grad(), autocast:
                token_entropies(raw, window, return_nll=True)
        t_train, t_entropy, ratio = paired(
            lambda: train_step(ours, False, inputs, targets, autocast), entropy_pass, device,
            args.repeats)
        rows.append((f"{label}: entropy pass tokens/s vs training",
                     f"{tokens / t_entropy:,.0f} vs {tokens / t_train:,.0f}", f"{1 / ratio:.2f}x"))
        scores = torch.rand(batch, seq_len, dtype=torch.float16).float()
        scores[:, 0] = float("nan")
        counter = iter(range(10**9))
        # The two sides differ by ~1%, well inside one pair's noise: take a minute's worth of pairs.
        pairs = args.repeats if args.smoke else max(args.repeats, int(30 / t_train))
        t_base, t_drop, ratio = paired(lambda: train_step(ours, False, inputs, targets, autocast),
                                       lambda: entrodrop_step(ours, inputs, targets, scores,
                                                              next(counter), autocast),
                                       device, pairs)
        rows.append((f"{label}: EntroDrop step time vs baseline",
                     f"{t_drop * 1e3:,.1f} ms vs {t_base * 1e3:,.1f} ms", f"{ratio - 1:+.1%}"))
        table = torch.rand(batch, seq_len + 1)
        t_static, t_online, ratio = paired(
            lambda: entrodrop_step(ours, inputs, targets, scores, next(counter), autocast),
            lambda: online_entrodrop_step(ours, inputs, targets, scores, table, next(counter),
                                          autocast),
            device, pairs)
        rows.append((f"{label}: EntroDrop step, online scores vs static",
                     f"{t_online * 1e3:,.1f} ms vs {t_static * 1e3:,.1f} ms", f"{ratio - 1:+.1%}"))
        # The full-step ratio above carries the machine's noise; EntroDrop's additions alone do not.
        embeddings = torch.randn(batch, seq_len, config.hidden_size, device=device,
                                 requires_grad=True)
        fill, upstream = (torch.randn(config.hidden_size, device=device),
                          torch.randn_like(embeddings))
        t_added = median_seconds(lambda: entrodrop_added_work(embeddings, fill, upstream, scores,
                                                              next(counter)),
                                 device, 5 * args.repeats)
        rows.append((f"{label}: EntroDrop's additions alone (mask, fill fwd+bwd)",
                     f"{t_added * 1e3:,.2f} ms vs {t_base * 1e3:,.1f} ms",
                     f"+{t_added / t_base:.2%}"))
        del ours, theirs, raw

    rows += generation_rows(smol, device, autocast, *((2, 4) if args.smoke else ()))

    memory_config = replace(qwen, num_hidden_layers=2 if not gpu else qwen.num_hidden_layers)
    logits_bytes = lambda seq: seq * memory_config.vocab_size * 4
    entropy_seq, train_seq = (256, 256) if args.smoke else (4096, 4096 if gpu else 1024)
    extra = peak_memory("entropy", memory_config, 1, entropy_seq, device, dtype)
    rows.append((f"entropy pass extra peak memory, vocab 151,936, seq {entropy_seq}",
                 f"{extra / 2**30:.2f} GiB",
                 f"{extra / logits_bytes(entropy_seq):.2f}x one fp32 logits"))
    ours_mem = peak_memory("ours", memory_config, 1, train_seq, device, dtype)
    theirs_mem = peak_memory("transformers", memory_config, 1, train_seq, device, dtype)
    rows.append((f"training step extra peak memory, seq {train_seq}, ours | transformers",
                 f"{ours_mem / 2**30:.2f} | {theirs_mem / 2**30:.2f} GiB",
                 f"{ours_mem / logits_bytes(train_seq):.2f}x | "
                 f"{theirs_mem / logits_bytes(train_seq):.2f}x one fp32 logits"))
    # From 1,024 tokens on, the peak comes in the forward pass (head_bytes), before one process has
    # any gradient, which training_memory counts among the states: its step term is all that is
    # added. (At --smoke's 256 the peak is the embedding's backward, beside the blocks' gradients.)
    _, predicted = training_memory(memory_config, train_seq, 1, 1, fsdp=False,
                                   activation_checkpointing=False, bf16=dtype == torch.bfloat16)
    rows.append((f"training step extra peak memory, seq {train_seq}, ours, measured | formula",
                 f"{ours_mem / 2**30:.2f} | {predicted / 2**30:.2f} GiB",
                 f"{ours_mem / predicted:.2f}x"))

    rows += activation_rows(smol, device, dtype, *((1, 256) if args.smoke else (2, 2048)))

    if datasheet_peak:
        print(f"datasheet peak: {peak / 1e12:.0f} TFLOP/s (dense bf16)\n")
    else:
        peak = max(peak, matmul_peak(device, dtype))
        print(f"measured matmul peak: {peak / 1e12:.3f} TFLOP/s ({args.dtype}, 2048^3)\n")
    rows = [(what, " | ".join(f"{x / peak:.1%}" for x in value) if isinstance(value, tuple)
             else value, ratio)
            for what, value, ratio in rows]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>28}  ratio")
    for what, value, ratio in rows:
        print(f"{what:<{width}}  {value:>28}  {ratio}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
