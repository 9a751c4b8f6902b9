"""The tensor-subclass machinery every recipe's weight shares.

A recipe replaces `linear.weight` with a `QuantizedWeight`: a wrapper tensor that looks like the
high-precision weight (shape, dtype, device) but stores whatever the recipe needs (INT8 data and
scales, or a latent high-precision copy). Three kinds of ops reach it:

- `F.linear`: routed by `__torch_function__` to `qt.linear.quantized_linear` with the recipe's plan.
- In-place ops with the weight as the written-to tensor (the optimizer step, `load_state_dict`'s
  `copy_`, foreach optimizer kernels): routed to `_update_`, which applies the op to a
  high-precision view and stores the result the recipe's way (for INT8 weight-only: re-quantized
  with stochastic rounding).
- Structure ops that must keep the subclass (detach, clone, `.to()`, and the ops FSDP2 shards with):
  applied to the inner tensors.

Every other op sees the dequantized weight and returns a plain tensor, so optimizers can build
their states with `zeros_like` and do arithmetic with the weight as with any parameter.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_map_only

from qt.linear import planned_matmul, quantized_linear

aten = torch.ops.aten

# Ops that keep the subclass, applied to each inner tensor as they come (the inner tensors share
# the weight's leading dimension, so slicing and splitting along dim 0 stay consistent).
_PER_INNER_OPS = {aten.detach.default, aten.clone.default, aten.alias.default}
_DIM0_OPS = {aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default}
# FSDP2 flattens its padded shard with `view(-1)` to keep a handle on the storage and re-strides
# the unsharded parameter with `as_strided` to the same shape; neither changes what the weight
# holds, so both return a new wrapper of the same inner tensors (row-wise scales cannot follow an
# arbitrary view; nothing but FSDP2 reshapes a weight).
_FSDP_VIEW_OPS = {aten.view.default, aten.as_strided.default, aten._unsafe_view.default}


def _writes_first_argument(func) -> bool:
    args = func._schema.arguments
    return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write


class _HookWithItsSignature:
    """A method whose bound form carries its signature ready-made. FSDP2 calls inspect.signature on a weight's
    `fsdp_pre_all_gather` before each all-gather of each weight. For a bound method inspect builds a new signature
    each time, even from a function that carries its own; an object's own `__signature__` it returns as it is
    (scripts/bench_fsdp_hooks.py, docs/scaling.md rounds 14 and 15)."""

    def __init__(self, function):
        self.function = function
        parameters = list(inspect.signature(function).parameters.values())
        self.bound_signature = inspect.Signature(parameters[1:])  # without self

    def __get__(self, instance, owner=None):
        if instance is None:
            return self.function
        bound = functools.partial(self.function, instance)
        bound.__signature__ = self.bound_signature
        return bound


class QuantizedWeight(torch.Tensor):
    """Base class of the recipes' weights. Subclasses define:

    - `_inner_names`: attribute names of the inner tensors, first one shaped like the weight;
    - `_metadata()`: the non-tensor constructor arguments that follow the inner tensors;
    - `dequantize(dtype=None)`, `_update_(fn)`, `_to(device, dtype)`, `_new_zeros(size, device)`;
    - `plan` (a `qt.linear.LinearPlan`; by default the config's) and the operands its matmuls take:
      `_forward_operands(dtype, plan)` -> (the forward's right operand [in, out], tensors to save) and
      `_grad_input_operand(saved, dtype, plan)` -> grad_input's right operand [out, in], or instead
      `_grad_input(saved, dy, dtype, plan)` -> grad_input itself, where it is not that plain matmul.
    """

    _inner_names: tuple[str, ...] = ()
    # FSDP2 shards whose all-gather sends the weight quantized keep what the quantization needs and makes: the
    # statistic of the whole weight, the all-gather inputs (tensors, metadata) and the hook's arguments they
    # were made with (param dtype, unsharded size). Any write to the weight clears the first two.
    _gather_statistic: Tensor | None = None
    _gather_inputs: tuple | None = None
    _gather_args: tuple | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        hook = cls.__dict__.get("fsdp_pre_all_gather")
        if hook is not None:
            cls.fsdp_pre_all_gather = _HookWithItsSignature(hook)

    @classmethod
    def _grad_input(cls, saved: tuple[Tensor, ...], dy, dtype: torch.dtype, plan) -> Tensor:
        """grad_input = dy @ W, `dy` as the plan quantized it for grad_input."""
        return planned_matmul(dy, cls._grad_input_operand(saved, dtype, plan), dtype, plan.grad_input)

    @staticmethod
    def _wrapper(cls, like: Tensor, dtype: torch.dtype) -> Tensor:
        return Tensor._make_wrapper_subclass(cls, like.shape, dtype=dtype, device=like.device)

    def _metadata(self) -> tuple:
        raise NotImplementedError

    @property
    def plan(self):
        return self.config.plan

    def _inner(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._inner_names]

    def _map_inner(self, fn) -> "QuantizedWeight":
        return type(self)(*[fn(t) for t in self._inner()], *self._metadata())

    def __tensor_flatten__(self):
        return list(self._inner_names), self._metadata()

    @classmethod
    def __tensor_unflatten__(cls, inner_tensors, metadata, outer_size, outer_stride):
        return cls(*[inner_tensors[name] for name in cls._inner_names], *metadata)

    def _stable_hash_for_caching(self) -> str:
        # torch.compile's AOT autograd cache keys compiled graphs on this: the class and its
        # non-tensor constructor arguments decide the graph.
        return f"{type(self).__qualname__}{self._metadata()!r}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, requires_grad={self.requires_grad})"
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            return quantized_linear(x, weight, bias, weight.plan, compute_dtype(x))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0]
        writes = _writes_first_argument(func)
        if writes:
            for written in self if isinstance(self, (list, tuple)) else [self]:
                if isinstance(written, QuantizedWeight):
                    written._gather_statistic = written._gather_inputs = None

        if isinstance(self, QuantizedWeight):
            if func in _PER_INNER_OPS:
                out = self._map_inner(lambda t: func(t, *args[1:], **kwargs))
                return return_and_correct_aliasing(func, args, kwargs, out)
            if func in _DIM0_OPS:
                return self._split_rows(func, args[1:], kwargs)
            if func in _FSDP_VIEW_OPS:
                out = self._map_inner(lambda t: t)
                return return_and_correct_aliasing(func, args, kwargs, out)
            if func is aten._to_copy.default:
                return self._to(kwargs.get("device"), kwargs.get("dtype"))
            if func is aten.new_zeros.default:
                return self._new_zeros(args[1], kwargs.get("device"))
            if func is aten.copy_.default:
                if type(args[1]) is type(self):
                    for dst, src in zip(self._inner(), args[1]._inner()):
                        dst.copy_(src)
                else:  # e.g. an optimizer writing back its FP32 result: no need to read the old value
                    self._assign_(args[1].dequantize() if isinstance(args[1], QuantizedWeight) else args[1])
                return self

        if writes:
            rest = tree_map_only(QuantizedWeight, lambda t: t.dequantize(), (args[1:], kwargs))
            if isinstance(self, QuantizedWeight):
                self._update_(lambda hp: func(hp, *rest[0], **rest[1]))
                return self
            if isinstance(self, (list, tuple)):  # foreach kernels: one list element at a time
                return _foreach_update_(func, self, rest[0], rest[1])
            return func(self, *rest[0], **rest[1])

        args, kwargs = tree_map_only(QuantizedWeight, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)

    @property
    def gathers_quantized(self) -> bool:
        """Whether FSDP2 all-gathers this weight quantized (`_quantized_gather_inputs`) rather than as stored."""
        return False

    def _quantized_gather_inputs(self, dtype: torch.dtype, outer_size: torch.Size, mesh) -> tuple:
        """(all-gather inputs, metadata) of this shard quantized for the all-gather, from the weight in `dtype`
        (FSDP's param dtype); `outer_size` is the unsharded weight's size, `mesh` FSDP's device mesh."""
        raise NotImplementedError

    def quantized_gather_inputs(self, dtype: torch.dtype, outer_size: torch.Size, mesh) -> tuple:
        """For `fsdp_pre_all_gather`: `_quantized_gather_inputs`, made once per change of the weight (by
        `prepare_all_gathers` after an optimizer step, or here) and reused by every all-gather until then (the
        forward's and the backward's)."""
        self._gather_args = (dtype, outer_size)
        if self._gather_inputs is None:
            self._gather_inputs = self._quantized_gather_inputs(dtype, outer_size, mesh)
        tensors, metadata = self._gather_inputs
        for tensor in tensors:  # made on another stream (or step) than the all-gather's copy-in that reads it
            keep_for_current_stream(tensor)
        return tensors, metadata

    def _gather_statistic_source(self) -> tuple[Tensor, str] | None:
        """For a weight whose FSDP2 all-gather quantizes each shard with a statistic of the whole weight: the
        shard's tensor it is taken over and which statistic ("abs_sum" or "abs_max"); None for the others."""
        return None

    def whole_weight_statistic(self, group) -> Tensor:
        """For `_quantized_gather_inputs`: the statistic of `_gather_statistic_source` over every shard of `group`
        (float32, one element): the one `prepare_all_gathers` stored since the weight last changed, else one
        all-reduce for this weight alone."""
        if self._gather_statistic is not None:
            return self._gather_statistic
        source, kind = self._gather_statistic_source()
        value = _shard_statistics([source], kind)
        dist.all_reduce(value, op=_STATISTIC_REDUCE_OPS[kind], group=group)
        return value[0]

    def _in_place_target(self) -> Tensor | None:
        """The high-precision tensor an in-place update may write directly (a master or latent weight),
        or None when the weight is stored quantized and an update must go through `_update_`."""
        return None

    def _fused_adam_step_(self, grad, exp_avg, exp_avg_sq, step, **hyperparameters) -> bool:
        """Takes a step of torch's fused Adam / AdamW (`hyperparameters`: its keyword arguments and
        `decoupled_weight_decay`) in one kernel and returns True, or returns False where the class has no
        such kernel for this weight (then the step goes through FP32 copies)."""
        return False

    def _assign_(self, value: Tensor) -> None:
        """Stores `value` (shaped like the weight) the recipe's way."""
        self._update_(lambda hp: hp.copy_(value))

    def _split_rows(self, func, args, kwargs):
        dim_index = [a.name for a in func._schema.arguments].index("dim") - 1  # args here exclude self
        dim = args[dim_index] if len(args) > dim_index else kwargs.get("dim", 0)
        if dim != 0:
            raise NotImplementedError(
                f"{type(self).__name__} can only be sliced or split along dim 0 (output features), got dim={dim}"
            )
        pieces = [func(t, *args, **kwargs) for t in self._inner()]
        if isinstance(pieces[0], (list, tuple)):
            return [type(self)(*inner, *self._metadata()) for inner in zip(*pieces)]
        return type(self)(*pieces, *self._metadata())


# torch's fused Adam steps -> whether the weight decay is decoupled (AdamW). Their list arguments: the
# weights, then grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps.
_FUSED_ADAM_STEPS = {aten._fused_adam_.default: False, aten._fused_adam_.tensor_lr: False,
                     aten._fused_adamw_.default: True, aten._fused_adamw_.tensor_lr: True}


def _foreach_update_(func, tensors, rest_args, kwargs):
    """Applies an in-place foreach op (a foreach or fused optimizer step: `_foreach_addcdiv_`,
    `_fused_adamw_`, ...) to a list holding quantized weights, in at most two calls.

    Weights that keep a high-precision tensor updated in place (a master or latent weight) join the
    plain tensors in one call. Weights stored quantized take a fused Adam step in their own kernel where
    the class has one (`_fused_adam_step_`); the others go through a second call on FP32 copies, of
    every list argument for those entries (a fused kernel reads one dtype per entry), and are stored
    back the recipe's way; the op's other written arguments (optimizer states) are copied back."""
    targets = [t._in_place_target() if isinstance(t, QuantizedWeight) else t for t in tensors]
    direct = [i for i, target in enumerate(targets) if target is not None]
    stored = [i for i, target in enumerate(targets) if target is None]
    if func in _FUSED_ADAM_STEPS:
        grads, exp_avgs, exp_avg_sqs, _, steps = rest_args
        stored = [i for i in stored if not tensors[i]._fused_adam_step_(
            grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i], decoupled_weight_decay=_FUSED_ADAM_STEPS[func], **kwargs)]
    written = [arg.alias_info is not None and arg.alias_info.is_write for arg in func._schema.arguments[1:]]

    def take(indices, arg, convert=lambda t: t):
        if isinstance(arg, (list, tuple)) and len(arg) == len(tensors):  # a list that pairs with the weights
            return [convert(arg[i]) for i in indices]
        return arg

    if direct:
        func([targets[i] for i in direct], *[take(direct, a) for a in rest_args], **kwargs)
    if stored:
        fp32 = [tensors[i].dequantize(torch.float32) for i in stored]
        args = [take(stored, a, lambda t: t.float() if isinstance(t, Tensor) and t.is_floating_point() else t)
                for a in rest_args]
        func(fp32, *args, **kwargs)
        # A fused step told that the gradients are not finite (found_inf, as GradScaler and the training loop
        # set it) leaves its tensors alone: so must the store, whose rounding would move the weight.
        skip = kwargs.get("found_inf")
        for i, value in zip(stored, fp32):
            before = [t.clone() for t in tensors[i]._inner()] if skip is not None else None
            tensors[i]._assign_(value)
            if before is not None:
                for inner, old in zip(tensors[i]._inner(), before):
                    inner.copy_(torch.where(skip.bool(), old, inner))
        for arg, copies, is_written in zip(rest_args, args, written):
            if is_written and copies is not arg:
                for i, copy in zip(stored, copies):
                    if copy is not arg[i]:
                        arg[i].copy_(copy)
    return None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear computes in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def keep_for_current_stream(metadata: Tensor) -> Tensor:
    """A tensor made on another stream than the current one (an FSDP2 hook's metadata, made on FSDP's all-gather
    stream; a cached all-gather input, made after the optimizer step), marked as used by the current stream:
    otherwise, once its last reference goes, its memory returns to the making stream's pool while this stream may
    not have read it yet, and a later allocation there (a prefetched all-gather) may overwrite it."""
    if metadata.is_cuda:
        metadata.record_stream(torch.cuda.current_stream(metadata.device))
    return metadata


_STATISTIC_NORMS = {"abs_sum": 1, "abs_max": math.inf}
_STATISTIC_REDUCE_OPS = {"abs_sum": dist.ReduceOp.SUM, "abs_max": dist.ReduceOp.MAX}


def _shard_statistics(sources: list[Tensor], kind: str) -> Tensor:
    """[len(sources)] float32: each shard's part of the statistic `kind`, in one multi-tensor kernel."""
    filled = [t for t in sources if t.numel()]  # an empty shard (uneven sharding) adds nothing
    norms = iter(torch._foreach_norm(filled, _STATISTIC_NORMS[kind], dtype=torch.float32) if filled else ())
    zero = sources[0].new_zeros((), dtype=torch.float32)
    values = torch.stack([next(norms) if t.numel() else zero for t in sources])
    if kind == "abs_max":  # as qt.kernels.fp8.abs_max: NaN counts as inf, so the max over shards keeps it
        values = torch.where(values.isnan(), math.inf, values)
    return values


@torch.no_grad()
def prepare_all_gathers(model: nn.Module) -> None:
    """Readies the FSDP2 shards of `model` whose all-gather sends the weight quantized (the recipes' `*_all_gather`
    options) for the next all-gathers: the statistics of the whole weights their quantization needs (BitNet's
    mean |W|, FP8's tensor-wise abs-max) in one all-reduce per kind, then each shard quantized once. Call it after
    each optimizer step (the training loop does; the optimizer's writes clear what it made). Without it, each
    all-gather hook quantizes its shard itself, after an all-reduce for that weight alone, the first time a weight
    is gathered after a change (FSDP2's hooks run between the compiled blocks, where the host's time is the
    step's). The quantized shards stay in memory until the weight changes (about one byte an element of the
    shard). A no-op for a model with no such weights."""
    shards: list[tuple[QuantizedWeight, object]] = []  # (shard, its device mesh)
    statistics: dict[tuple, list[tuple[QuantizedWeight, Tensor]]] = {}
    for param in model.parameters():  # the same order on every process
        local = param._local_tensor if isinstance(param, DTensor) and param.device_mesh.ndim == 1 else None
        if not isinstance(local, QuantizedWeight) or not local.gathers_quantized:
            continue
        shards.append((local, param.device_mesh))
        needed = local._gather_statistic_source()
        if needed is not None:
            source, kind = needed
            statistics.setdefault((param.device_mesh.get_group(), kind), []).append((local, source))
    for (group, kind), entries in statistics.items():
        values = _shard_statistics([source for _, source in entries], kind)
        dist.all_reduce(values, op=_STATISTIC_REDUCE_OPS[kind], group=group)
        for (local, _), value in zip(entries, values.unbind()):
            local._gather_statistic = value
    for local, mesh in shards:
        if local._gather_inputs is None and local._gather_args is not None:  # known after its first all-gather
            local._gather_inputs = local._quantized_gather_inputs(*local._gather_args, mesh)
