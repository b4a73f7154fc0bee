"""
Per-token entropy under the base model, computed once over the target data and cached (Sec. 3.2).

    python entropy.py --init_from CKPT --target_data DIR --seq_len 4096
    torchrun --nproc_per_node=8 entropy.py --init_from CKPT --target_data DIR --seq_len 4096

For token x_t of a window, H(x_t) = -sum_v p(v | x_<t) log p(v | x_<t) in nats under the base
model (the checkpoint before continual pre-training), the quantity EntroDrop's gate ranks
(Eq. 2). Beside it the cache keeps the negative log-likelihood of x_t itself, -log p(x_t | x_<t),
the base model's confidence in the actual token (Fig. 1c), which can rank tokens instead and
which splits validation tokens into low- and high-entropy groups. Both come from one forward
pass: over N epochs the pass costs less than 1/N of training.

The cache (safetensors, float16) holds, for each split of the target folder, an array
(n_windows, seq_len + 1) aligned with the loader's stable window indices; column 0 of every
window is NaN: nothing predicts it. Its header records which model and which data produced it,
and training refuses a cache that does not match.
"""

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from data.loader import load_meta, read_windows, verify_checksums
from model import replace_durably

CACHE_FORMAT = "entrodrop-entropy-v1"


def checkpoint_fingerprint(folder) -> str:
    """Identity of a HF checkpoint folder without reading all of it: config.json, and the size,
    first and last MiB of each safetensors file (the header, and weights at both ends)."""
    digest = hashlib.sha256()
    folder = Path(folder)
    for path in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
    return digest.hexdigest()


@torch.no_grad()
def token_entropies(model, idx, return_nll=False):
    """idx (B, T) -> (B, T) float32 entropies in nats: column t is H(p(. | idx[:, :t])); column 0
    has no prediction and is NaN. With return_nll, also (B, T) -log p(idx[:, t] | idx[:, :t]).

    The model computes both in its forward (head_statistics), over a few hundred positions at a
    time, so the (B, T, vocab) fp32 logits never exist at once (2.5 GB for one 4,096-token
    sequence at vocab 151,936), and a model whose weights are sharded gathers them as it goes."""
    device = idx.device.type
    # Under the caller's autocast, if any, but without its cache: each layer's weight is used once
    # here, and caching the low-precision copies of all of them would only hold memory (1.2 GB
    # for Qwen3-0.6B).
    with torch.autocast(device, dtype=torch.get_autocast_dtype(device),
                        enabled=torch.is_autocast_enabled(device), cache_enabled=False):
        # (B, T - 1) each: columns 1 .. T-1
        entropy, nll = model(idx[:, :-1], idx[:, 1:], per_token=True)
    nan_column = torch.full((idx.shape[0], 1), float("nan"), device=idx.device)
    entropy, nll = torch.cat((nan_column, entropy), dim=1), torch.cat((nan_column, nll), dim=1)
    return (entropy, nll) if return_nll else entropy


def default_cache_path(target_data, model_fingerprint, seq_len) -> str:
    return str(Path(target_data) / f"entropy_{model_fingerprint[:12]}_seq{seq_len}.safetensors")


def cache_header(init_from, target_data, seq_len) -> dict:
    """What a cache must have been computed from: model, data and window length."""
    splits = load_meta(target_data)["splits"]
    return {"format": CACHE_FORMAT, "model": checkpoint_fingerprint(init_from),
            "seq_len": str(seq_len),
            "data": ",".join(splits[s]["sha256"] for s in ("train", "val"))}


def load_entropy_cache(path, header, rebuild_hint) -> dict:
    """{"train_entropy", "train_nll", "val_entropy", "val_nll"} float32 tensors, if the cache at
    path was computed from what `header` describes; otherwise an error that says how to rebuild."""
    try:
        with safe_open(path, framework="pt") as f:
            found, tensors = (f.metadata() or {},
                              {key: f.get_tensor(key).float() for key in f.keys()})
    except Exception as e:  # safetensors reports a truncated or damaged file as its own error type
        raise ValueError(f"entropy cache {path} is unreadable ({type(e).__name__}: {e}); delete it "
                         "and it is rebuilt by the next run, or rebuild it with: "
                         f"{rebuild_hint}") from None
    for key, expected in header.items():
        if found.get(key) != expected:
            raise ValueError(f"entropy cache {path} does not match this run: its {key} is "
                             f"{found.get(key, 'missing')!r}, expected {expected!r} (the model or "
                             f"the data changed). Delete it, or rebuild it with: {rebuild_hint}")
    return tensors


@torch.no_grad()
def build_entropy_cache(model, target_data, seq_len, path, header, batch_size, rank=0,
                        world_size=1):
    """Run the model over every window of target_data's train and val splits, ranks taking every
    world_size-th window, and write the cache (rank 0). Under autocast if the caller set one.
    A token id outside the model's vocabulary is an error that names its file."""
    device = next(model.parameters()).device
    tensors = {}
    for split in ("train", "val"):
        windows = torch.from_numpy(read_windows(target_data, split, seq_len,  # (n, seq_len + 1)
                                                vocab_size=model.config.vocab_size))
        share = -(-len(windows) // world_size)
        mine = windows[rank::world_size]
        # Every rank runs as many forward passes (each gathers weights from all ranks under FSDP):
        # a short share is filled up with repeats of window 0, whose results fall beyond the real
        # windows.
        mine = torch.cat((mine, windows[:1].expand(share - len(mine), -1)))
        scores = torch.full((share, seq_len + 1, 2), float("nan"), device=device)
        for start in tqdm(range(0, share, batch_size), desc=f"entropy of {split} windows",
                          disable=rank != 0):
            entropy, nll = token_entropies(model, mine[start:start + batch_size].to(device),
                                           return_nll=True)
            scores[start:start + len(entropy)] = torch.stack((entropy, nll), dim=-1)
        # Window i was computed by rank i % world_size, as its (i // world_size)-th.
        if world_size > 1:
            gathered = [torch.empty_like(scores) for _ in range(world_size)]
            dist.all_gather(gathered, scores)
            scores = torch.stack(gathered, dim=1).flatten(0, 1)
        scores = scores[:len(windows)].half().cpu()
        tensors[f"{split}_entropy"], tensors[f"{split}_nll"] = (scores[..., 0].contiguous(),
                                                                scores[..., 1].contiguous())
    if rank == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(f"{path}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(temporary), metadata=header)
            replace_durably(temporary, path)
        finally:  # a failed or interrupted write leaves no partial file beside the cache
            temporary.unlink(missing_ok=True)
    if world_size > 1:
        dist.barrier()


def main(argv=None):
    from model import Transformer
    from tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(
        description="Build the entropy cache of a base model over target data.")
    parser.add_argument("--init_from", required=True, help="the base model's HF checkpoint folder")
    parser.add_argument("--target_data", required=True,
                        help="a prepared data folder (train.bin, val.bin, meta.json)")
    parser.add_argument("--seq_len", type=int, required=True,
                        help="the window length training will use")
    parser.add_argument("--entropy_cache", default="",
                        help="output path (default: inside target_data)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    args = parser.parse_args(argv)
    # Checked before anything loads: 0 would divide by zero or step a range by zero later.
    if args.seq_len < 1:
        raise ValueError(f"--seq_len {args.seq_len} is below 1: give the window length training "
                         "will use (train.py's seq_len)")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size} is below 1: give the number of windows "
                         "per forward pass (default 8; fewer use less memory)")
    gpu = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if gpu else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    # As train.py builds it: fp32 weights, under bf16 autocast on a GPU, so that both give one
    # cache.
    model = Transformer.from_pretrained(args.init_from, device=device).eval()
    if args.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq_len {args.seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    # The checks of train.py's path: the data fits the model's tokenizer and vocabulary, and its
    # files still have the sha256 in meta.json that the cache is keyed on.
    load_meta(args.target_data, load_tokenizer(args.init_from), model.config.vocab_size)
    verify_checksums(args.target_data)
    header = cache_header(args.init_from, args.target_data, args.seq_len)
    path = args.entropy_cache or default_cache_path(args.target_data, header["model"], args.seq_len)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
        build_entropy_cache(model, args.target_data, args.seq_len, path, header, args.batch_size,
                            rank, world_size)
    if rank == 0:
        print(f"wrote {path}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    finally:
        # Also after an error: a group left to the interpreter's exit can abort.
        if dist.is_initialized():
            dist.destroy_process_group()
