"""Process group, device and numerics setup, and how a model is wrapped for training: activation
checkpointing, torch.compile and FSDP2 / DDP, applied per transformer block.

Under torchrun, on one node or several (docs/distributed.md): RANK (0 .. WORLD_SIZE - 1 over all nodes)
decides who logs and writes the run's files (rank 0) and which part of each batch and checkpoint a process
owns; LOCAL_RANK (0 .. GPUs per node - 1) only picks the GPU.
"""

from __future__ import annotations

import functools
import os
import secrets
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from qt.quantize import inductor_options
from qt.training.config import ConfigError


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


def check_run_dir_shared(run_dir: str | Path, dist_info: Dist) -> None:
    """Refuse a --run_dir that is not the same folder for every process (a node-local path on several
    nodes): rank 0 writes the config, metrics and checkpoint pointer there, and every rank writes its part of
    each checkpoint and reads the saved config on --resume. Every process raises the same one-line error,
    where otherwise the ranks that see another folder would fail alone and leave the others waiting."""
    if dist_info.world_size == 1:
        return
    run_dir = Path(run_dir)
    token = torch.tensor([1 + secrets.randbits(62) if dist_info.is_main else 0], device=dist_info.device)
    write_error = "rank 0 could not write there"
    if dist_info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            # A fresh name each run: a network filesystem may cache that an earlier marker was absent.
            (run_dir / f".rank0_{token.item()}").touch()
        except OSError as e:
            token.zero_()  # tells every rank to stop, here, together
            write_error = f"{write_error} ({e.strerror})"
    dist.broadcast(token, src=0)  # after rank 0's write
    if token.item() == 0:
        raise ConfigError(f"--run_dir {run_dir}: {write_error}; pick a folder you can write to")
    marker = run_dir / f".rank0_{token.item()}"
    blind = torch.zeros(dist_info.world_size, device=dist_info.device)
    blind[dist_info.rank] = not marker.is_file()
    any_blind = bool(all_reduce_sum(blind).any())
    # Only now, after the host read the reduced result: NCCL's all_reduce returns before the other ranks have
    # joined it, so rank 0 removing the marker earlier hid it from ranks still about to look (seen on 4 GPUs).
    if dist_info.is_main:
        marker.unlink()
    if any_blind:
        ranks = blind.nonzero().flatten().tolist()
        raise ConfigError(f"--run_dir {run_dir} is not one folder shared by every process: rank(s) {ranks} do not "
                          "see the file rank 0 wrote there. On several nodes, put it on a filesystem every node "
                          "mounts at the same path (NFS, Lustre, ...)")


@contextmanager
def distributed_processes():
    """`init_distributed()`'s Dist for the body of an entry point; the process group destroyed after it, where the
    body returns or exits as a stopped run does (`SystemExit`, on every rank together after its checkpoint). Where it
    raises an error, the group is left as it is and the error goes on up: another rank may be blocked in a
    collective this one will never join (an FSDP2 all-gather, say), and destroying an NCCL group waits for it. Seen
    on 2 H200s: the failing rank hung in `destroy_process_group` and its error was never printed. The process exits
    with its error instead, and torchrun stops the other ranks."""
    dist_info = init_distributed()
    try:
        yield dist_info
    except SystemExit:
        _destroy_process_group()
        raise
    _destroy_process_group()


def _destroy_process_group() -> None:
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
                activation_checkpointing: bool, compile: bool, ddp: bool, fsdp_prefetch: int = 0,
                reshard_after_forward: bool = True, unit_blocks: int = 1) -> nn.Module:
    """Wrap a (possibly quantized) model for training. Returns the module to call: DDP wraps the model,
    the other transformations work in place and keep the state_dict keys. `blocks` are in the order the
    forward runs them. FSDP2 only: each `unit_blocks` consecutive blocks form one FSDP2 unit (gathered and
    reduced together); `fsdp_prefetch`: see `prefetch_units`; `reshard_after_forward` False keeps every unit's
    gathered weights from its forward to its backward (no all-gather in the backward)."""
    for block in blocks:
        if activation_checkpointing:
            # Overriding forward (instead of wrapping the block) keeps parameter names unchanged.
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if compile:
            block.compile(options=inductor_options(block))
    if dist_info.world_size == 1:
        return model
    if ddp:
        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    units = [blocks[i:i + unit_blocks] for i in range(0, len(blocks), unit_blocks)]
    for i, unit in enumerate(units):
        # The last unit stays gathered after its forward (as in torchtitan): the backward needs it first, right
        # after the output layer's, so FSDP2 would free it only to all-gather it again at once. Keeping it saves
        # that all-gather every micro-step for one unit's gathered weights held through the output layer and
        # the loss, and changes no number (a re-gather gives the same weights: a quantized all-gather reuses the
        # step's gather inputs). Always on, not tied to --fsdp_prefetch: implicit prefetching gains as much.
        # Like the root (FSDP2 never reshards it after forward), it also stays gathered after a forward without
        # gradients until the next backward; the loop validates after the optimizer step, so the next forward
        # still sees current weights (a forward without gradients before the optimizer step would leave both
        # stale). A unit of several blocks is one FSDP2 state that its blocks share.
        fully_shard(unit if len(unit) > 1 else unit[0], mp_policy=policy,
                    reshard_after_forward=reshard_after_forward and i < len(units) - 1)
    fully_shard(model, mp_policy=policy)
    if fsdp_prefetch:
        prefetch_units(model, [unit[0] for unit in units], fsdp_prefetch)
    return model


# Units ahead that FSDP2 all-gathers explicitly (`prefetch_units`) where --fsdp_prefetch is not given. TinyLlama-1.1B
# shape, 8 sequences per GPU, units of 2 blocks, 4 H200s (docs/scaling.md, round 14): int8_mixed_precision scaled
# 87.0% with 2, against 85.1% with FSDP2's implicit prefetching, once its default with one block a unit (round 7).
DEFAULT_FSDP_PREFETCH = 2


def fsdp_prefetch_units(cfg) -> int:
    """The run's --fsdp_prefetch, or the default where it gives none."""
    return DEFAULT_FSDP_PREFETCH if cfg.fsdp_prefetch is None else cfg.fsdp_prefetch


def prefetch_units(root: nn.Module, blocks: list[nn.Module], depth: int) -> None:
    """Explicit FSDP2 prefetching, `depth` units ahead (`blocks`: a block of each FSDP2 unit, in forward order; a
    unit's blocks share its state): unit i starts the all-gathers of units i+1 .. i+depth when its forward starts,
    and of units i-1 .. i-depth (in that order) when its backward starts, so each all-gather has `depth` units'
    compute to hide behind, where FSDP2's implicit prefetching has one (and in the forward issues each all-gather
    only once the CPU has launched the unit before). The root, whose forward starts before unit 0 and whose
    backward starts before the last unit's, prefetches the first `depth` units and the last `depth` (last first).
    Each all-gather in flight holds its unit's gathered weights: up to `depth` + 1 units' at a time."""
    root.set_modules_to_forward_prefetch(blocks[:depth])
    root.set_modules_to_backward_prefetch(blocks[::-1][:depth])
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + depth])
        block.set_modules_to_backward_prefetch(blocks[max(i - depth, 0):i][::-1])


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
