"""
Data parallelism, one setting away from the plain loop, started by torchrun on one node or many:

    ddp   (the default) every rank holds the whole model; DistributedDataParallel averages the
          gradients. About 16 bytes per parameter on every GPU: fp32 weights, gradients, AdamW's
          two moments.
    fsdp  PyTorch's FSDP2 (fully_shard) on each block and on the root: each rank keeps 1/N of the
          weights, gradients and moments, and gathers one block's weights just before using them.
          On a GPU the gathered weights are bf16, and gradients are reduced in fp32.

Nothing here is home-made: DDP and fully_shard do the work; this file picks one, and keeps the
code outside the training step correct under it: every rank must run the same number of forward
passes (each one is a collective under FSDP), so work split across ranks is padded to equal shares.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class Cluster:
    """Where this process sits: its rank among world_size, and its device."""
    rank: int
    world_size: int
    device: torch.device
    distributed: bool

    @property
    def master(self):
        return self.rank == 0


def start(device_setting) -> Cluster:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK; absent for a plain `python`), pick
    the device, and join the process group: NCCL between GPUs, gloo between CPU processes."""
    device_type = (("cuda" if torch.cuda.is_available() else "cpu") if device_setting == "auto"
                   else device_setting)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    distributed = "RANK" in os.environ
    if distributed:
        # While rank 0 writes an export (16 GB for an 8B model) the others wait in the next
        # collective; NCCL's default of 10 minutes can be too short.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=60))
    return Cluster(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), device,
                   distributed)


def mixed_precision_policy(bf16, device):
    """FSDP's dtypes: on a GPU with bf16 autocast, the weights are gathered in bf16 (half the bytes
    to send and to hold) and gradients are reduced in fp32, so that the sum over ranks is not
    rounded to bf16; elsewhere weights and gradients stay fp32, as under DDP."""
    if bf16 and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def wrap(model, parallel, cluster, compile_model, bf16):
    """The module that the training step calls. Under DDP it wraps the model (which stays as it is
    for evaluation and export); under FSDP the model itself is sharded in place."""
    if parallel == "fsdp":
        policy = mixed_precision_policy(bf16, cluster.device)
        for block in model.layers:
            if compile_model:
                # In place: the parameter names, and so the checkpoints, stay the same.
                block.compile()
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the root: embeddings, final norm and the tied head
        return model
    train_model = torch.compile(model) if compile_model else model
    if cluster.distributed:
        # Gradients as views into the all-reduce buckets: one copy of them per GPU instead of two.
        train_model = DDP(train_model,
                          device_ids=([cluster.device.index] if cluster.device.type == "cuda"
                                      else None),
                          gradient_as_bucket_view=True)
    return train_model


def reshard(model):
    """After forward passes outside training (evaluation, the entropy pass), put a sharded model's
    root weights (embeddings, final norm, head) back into their shards: FSDP keeps the root's
    gathered after a forward, expecting the backward pass that training would bring."""
    if isinstance(model, FSDPModule):
        model.reshard()


def set_gradient_sync(train_model, enabled):
    """Reduce gradients across ranks in this backward pass or not: only the last micro-batch of a
    step need do it (gradient accumulation)."""
    if isinstance(train_model, FSDPModule):
        train_model.set_requires_gradient_sync(enabled)
    elif isinstance(train_model, DDP):
        train_model.require_backward_grad_sync = enabled


def gather_from_all_ranks(tensor, world_size):
    """Every rank's tensor of the same shape, concatenated in rank order along the first
    dimension."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def equal_share(n_items, rank, world_size, batch):
    """This rank's batches when n_items are split across ranks: in every block of
    world_size * batch items, rank r takes [r * batch, (r + 1) * batch). Every rank gets the same
    number of batches: one whose share has run out is given the first batch again, marked not to
    be counted. (Under FSDP each forward pass gathers weights from all ranks, so a rank that
    stopped early would leave the others waiting for ever.) -> [(start, stop, counted)]"""
    shares = []
    for block in range(0, n_items, world_size * batch):
        start = block + rank * batch
        shares.append((start, min(start + batch, n_items), True) if start < n_items
                      else (0, min(batch, n_items), False))
    return shares
