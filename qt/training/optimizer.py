"""The optimizer named by --optim, and the learning-rate schedule."""

from __future__ import annotations

import importlib
import inspect
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from qt.training.config import ConfigError, effective_warmup_steps


def optimizer_class(name: str) -> type:
    """A torch.optim class, or else a qt.optim one (the project's low-bit optimizers, imported only then)."""
    if isinstance(getattr(torch.optim, name, None), type):
        return getattr(torch.optim, name)
    try:
        qt_optim = importlib.import_module("qt.optim")
    except ImportError:
        qt_optim = None
    if isinstance(getattr(qt_optim, name, None), type):
        return getattr(qt_optim, name)
    raise ConfigError(f"--optim {name!r} is neither a torch.optim nor a qt.optim class (e.g. AdamW, SGD"
                      f"{', AdamW8bit' if qt_optim else ''})")


# Where torch's fused Adam(W) is picked by default: one kernel for all parameters, and it skips a step on the
# device when the loop finds a non-finite loss or gradient (see loop.RunningStats), so the loop need not sync.
FUSED_BY_DEFAULT_ON = ("cuda",)


def _fused_step_skips(param: torch.Tensor) -> bool:
    """Whether torch's fused AdamW steps a copy of `param` and leaves it untouched when `found_inf` is set, as
    the loop relies on (a recipe's weight class may not support the fused step, or not honour found_inf)."""
    trial = param.detach().clone().requires_grad_()
    trial.grad = torch.ones(trial.shape, dtype=trial.dtype, device=trial.device)
    before = trial.detach().clone()
    optimizer = torch.optim.AdamW([trial], lr=1.0, fused=True)
    optimizer.found_inf = torch.ones((), device=trial.device)
    try:
        optimizer.step()
    except Exception:  # noqa: BLE001 (whatever the weight class raises, the fused path is not for it yet)
        return False
    return bool(torch.equal(trial.detach(), before))


def fused_by_default(cls: type, params: list[torch.Tensor], kwargs: dict) -> bool:
    """Pick fused=True for a torch Adam / AdamW whose flags leave the implementation open, on a GPU, when every
    parameter takes a fused step that honours found_inf: plain ones do, a quantized weight class is tried on a
    copy of its smallest weight."""
    if cls not in (torch.optim.Adam, torch.optim.AdamW) or {"fused", "foreach"} & kwargs.keys():
        return False
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    if not all(p.device.type in FUSED_BY_DEFAULT_ON for p in local):
        return False
    by_class = {}
    for p in sorted((p for p in local if p.numel()), key=torch.Tensor.numel):  # an FSDP2 shard may be empty
        by_class.setdefault(type(p), p)
    return all(_fused_step_skips(p) for cls_, p in by_class.items() if cls_ not in (torch.Tensor, nn.Parameter))


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Weight decay applies to matrices only: decaying norm gains and biases toward zero only hurts."""
    cls = optimizer_class(cfg.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    kwargs = {"lr": cfg.lr}
    if "betas" in inspect.signature(cls).parameters:
        kwargs["betas"] = tuple(cfg.betas)
    kwargs.update(cfg.optim_kwargs)
    if not cfg.offload_optimizer and fused_by_default(cls, params, kwargs):
        kwargs["fused"] = True
    groups = [g for g in groups if g["params"]]
    try:
        if cfg.offload_optimizer:
            from qt.optim.cpu_offload import CPUOffloadOptimizer
            return CPUOffloadOptimizer(groups, optimizer_class=cls, **kwargs)
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--optim {cfg.optim} with {kwargs}: {e}") from None


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup (effective_warmup_steps), then cosine
    decay to min_lr_ratio * lr, or warmup-stable-decay (constant, then a linear decay over the last
    decay_fraction), or constant. A pure function of the step, so a resumed run needs no scheduler state."""
    warmup_steps = effective_warmup_steps(cfg)
    if step <= warmup_steps:
        return cfg.lr * step / warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - warmup_steps) / max(cfg.n_steps - warmup_steps, 1)
        return min_lr + (cfg.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(round(cfg.n_steps * cfg.decay_fraction), 1)
        decay_start = cfg.n_steps - decay_steps
        if step <= decay_start:
            return cfg.lr
        return cfg.lr + (min_lr - cfg.lr) * (step - decay_start) / decay_steps
    return cfg.lr


def parallelize_with_optimizer(model: nn.Module, blocks: list[nn.Module], cfg, dist_info, compute_dtype: torch.dtype):
    """(the module to train, its optimizer): the model wrapped for the run's flags (FSDP2 / DDP,
    activation checkpointing, compile), then the optimizer built over its parameters, after FSDP2
    has replaced them with sharded ones."""
    from qt.training.distributed import fsdp_prefetch_units, parallelize

    prefetch = fsdp_prefetch_units(cfg)
    if dist_info.world_size > 1 and not cfg.ddp and dist_info.is_main:
        unit = "block" if cfg.fsdp_unit_blocks == 1 else f"unit of {cfg.fsdp_unit_blocks} blocks"
        print(f"FSDP2 over {dist_info.world_size} processes, a {unit} per all-gather, " +
              (f"all-gathering {prefetch} ahead" if prefetch else "with its implicit prefetching")
              + " (--fsdp_unit_blocks, --fsdp_prefetch)", flush=True)
    training_model = parallelize(model, blocks, dist_info, compute_dtype=compute_dtype,
                                 activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                                 ddp=cfg.ddp, fsdp_prefetch=prefetch,
                                 reshard_after_forward=cfg.fsdp_reshard_after_forward,
                                 unit_blocks=cfg.fsdp_unit_blocks)
    return training_model, build_optimizer(model, cfg)
