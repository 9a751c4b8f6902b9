"""Process group, device and numerics setup, and how a model is wrapped for training: activation
checkpointing, torch.compile and FSDP2 / DDP, applied per transformer block."""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """One process per GPU under torchrun (NCCL), or CPU processes (gloo); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_dtypes(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(weight dtype, compute dtype) for --dtype."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"  # CPU bf16 matmuls are slow on most CPUs
    return {"bf16": (torch.bfloat16, torch.bfloat16), "fp32": (torch.float32, torch.float32),
            "fp32_master": (torch.float32, torch.bfloat16)}[dtype]


def autocast(device: torch.device, weight_dtype: torch.dtype, compute_dtype: torch.dtype):
    if weight_dtype == compute_dtype:
        return nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)


def parallelize(model: nn.Module, blocks: list[nn.Module], dist_info: Dist, *, compute_dtype: torch.dtype,
                activation_checkpointing: bool, compile: bool, ddp: bool) -> nn.Module:
    """Wrap a (possibly quantized) model for training. Returns the module to call: DDP wraps the model,
    the other transformations work in place and keep the state_dict keys."""
    for block in blocks:
        if activation_checkpointing:
            # Overriding forward (instead of wrapping the block) keeps parameter names unchanged.
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if compile:
            block.compile()
    if dist_info.world_size == 1:
        return model
    if ddp:
        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, for state_dict and attribute access, whether or not DDP wraps it."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-step of an optimizer step. FSDP2
    reduce-scatters every micro-step: that keeps the gradients sharded (the point of FSDP)."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield
