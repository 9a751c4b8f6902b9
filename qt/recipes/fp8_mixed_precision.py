"""FP8 mixed precision: high-precision master weights, FP8 matmuls.

Each of a linear's three matmuls can run as a dynamically scaled FP8 matmul (see qt/linear.py), X and W in
E4M3 and the output gradient dY in E4M3 or E5M2:

    output      = X  @ W.T    X row-wise,     W row-wise       (or one scale each: tensor-wise)
    grad_input  = dY @ W      dY row-wise,    W column-wise
    grad_weight = dY.T @ X    dY column-wise, X column-wise

On CUDA GPUs of compute capability 8.9 or newer the matmuls run `torch._scaled_mm`; elsewhere an emulation
with the same numbers (qt/kernels/fp8.py). With tensor-wise scaling, FSDP2 all-gathers the weight in FP8
(one byte an element), scaled by the abs-max of the whole weight (one all-reduce of the shards' abs-maxima),
and the forward and grad_input use the gathered FP8 weight as it is.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qt.config import RecipeConfig
from qt.kernels.fp8 import E4M3, E5M2, SCALINGS, abs_max, fp8_kernel_unavailable, quantize_fp8
from qt.linear import HIGH_PRECISION, LinearPlan, MatmulPlan, QuantizedOperand
from qt.recipes.master_weight import MasterWeight
from qt.subclass import QuantizedWeight, keep_for_current_stream

GRAD_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}


@dataclasses.dataclass(frozen=True)
class Fp8MixedPrecisionConfig(RecipeConfig):
    """`scaling`: "tensorwise" (one scale per operand: the fastest) or "rowwise" (a scale per row or column, as
    INT8: more accurate with outliers). `fp8_all_gather`: with tensor-wise scales, FSDP2 all-gathers the weights
    in FP8 (half of BF16's bytes). Experimental, off by default: it trains on CPU processes (gloo), but on two
    H200s (torch 2.11, NCCL, compiled) the loss was NaN at the second step; the scale's cross-stream use, since
    recorded, is the suspected cause (not yet rerun on GPUs). `grad_dtype`: the FP8 format
    of the output gradient, "e4m3" or "e5m2" (more range, less precision); "auto" takes E5M2 with tensor-wise
    scales and E4M3 with row-wise ones, whose per-row scales leave less range to cover.
    `power_of_two_scales`: round every scale up to a power of two. `output`, `grad_input`, `grad_weight`: which
    matmuls run in FP8 (the others in the compute dtype); `grad_weight=False` with row-wise scaling is the
    variant that keeps grad_weight in high precision for stability."""

    name = "fp8_mixed_precision"
    scaling: str = "tensorwise"
    grad_dtype: str = "auto"
    power_of_two_scales: bool = False
    output: bool = True
    grad_input: bool = True
    grad_weight: bool = True
    fp8_all_gather: bool = False

    def __post_init__(self):
        super().__post_init__()
        for option, choices in (("scaling", SCALINGS), ("grad_dtype", ("auto", *GRAD_DTYPES))):
            value = getattr(self, option)
            if value not in choices:
                raise ValueError(f"recipe '{self.name}' option {option}={value!r}: use one of {', '.join(choices)}")

    def quantize_weight(self, weight: Tensor) -> Tensor:
        return Fp8MixedPrecisionWeight(weight, self)

    @property
    def plan(self) -> LinearPlan:
        grad_dtype = self.grad_dtype
        if grad_dtype == "auto":
            grad_dtype = "e5m2" if self.scaling == "tensorwise" else "e4m3"
        backward = MatmulPlan("fp8", scaling=self.scaling, grad_dtype=GRAD_DTYPES[grad_dtype],
                              power_of_two_scales=self.power_of_two_scales)
        # The forward accumulates in the kernel's fast mode, the gradients in full precision (as torchao does).
        output = MatmulPlan("fp8", scaling=self.scaling, power_of_two_scales=self.power_of_two_scales,
                            fast_accumulation=True)
        return LinearPlan(output if self.output else HIGH_PRECISION, backward if self.grad_input else HIGH_PRECISION,
                          backward if self.grad_weight else HIGH_PRECISION)

    @property
    def all_gathers_fp8(self) -> bool:
        """Whether FSDP2 all-gathers the weight in FP8: asked for, and both matmuls that read it scale it
        tensor-wise."""
        return self.fp8_all_gather and self.scaling == "tensorwise" and self.output and self.grad_input

    def incompatibility(self, linear: nn.Linear) -> str | None:
        weight = linear.weight
        if not weight.is_floating_point():
            return f"its weight is {weight.dtype}, not a floating-point tensor"
        # The emulation runs anywhere; only a forced kernel needs the hardware (a CPU weight may move to it).
        return fp8_kernel_unavailable(weight.device) if weight.is_cuda else None


class Fp8MixedPrecisionWeight(MasterWeight):
    """A high-precision master weight whose linear runs in FP8 (the config's plan)."""

    # FSDP2 with tensor-wise scales: the shard in FP8, scaled by the abs-max of the whole weight, as bytes
    # (every process group backend all-gathers bytes).
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        if not self.config.all_gathers_fp8:
            return super().fsdp_pre_all_gather(mesh, outer_size, outer_stride, module, mp_policy)
        # Quantized from what the unsharded forward would quantize: the master in FSDP's param dtype.
        shard = self.master.to(mp_policy.param_dtype or self.master.dtype)
        amax = abs_max(shard, None)  # FSDP's padding rows are zeros
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
        plan = self.config.plan.output
        q, scale = quantize_fp8(shard, 1, E4M3, "tensorwise", plan.power_of_two_scales, amax)
        return (q.view(torch.uint8),), scale

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        if not self.config.all_gathers_fp8:
            return super().fsdp_post_all_gather(outputs, metadata, param_dtype, out=out)
        (data,) = outputs
        scale = keep_for_current_stream(metadata)  # (the suspected cause of the NaN loss on GPUs)
        if out is not None:
            # FSDP re-gathered into the storage of `out.q`; the backward may have saved `out.scale`, so the
            # refill must not look like a modification to autograd.
            with torch.autograd._unsafe_preserve_version_counter(out.scale):
                out.scale.copy_(scale)
            return None
        q = data.view(E4M3)
        return Fp8GatheredWeight(q, scale, param_dtype, self.config), (q,)


class Fp8GatheredWeight(QuantizedWeight):
    """An FP8 weight with one scale, as FSDP2 un-shards an `Fp8MixedPrecisionWeight` with tensor-wise
    scaling: the forward and grad_input use it as it is. Its gradient is the one FSDP2 reduce-scatters back
    to the master shards."""

    _inner_names = ("q", "scale")

    @staticmethod
    @torch._dynamo.disable
    def __new__(cls, q: Tensor, scale: Tensor, dtype: torch.dtype, config: Fp8MixedPrecisionConfig):
        return QuantizedWeight._wrapper(cls, q, dtype)

    @torch._dynamo.disable
    def __init__(self, q: Tensor, scale: Tensor, dtype: torch.dtype, config: Fp8MixedPrecisionConfig):
        self.q = q
        self.scale = scale
        self.config = config

    def _metadata(self):
        return (self.dtype, self.config)

    def _forward_operands(self, dtype: torch.dtype, plan: LinearPlan):
        return QuantizedOperand(self.q, self.scale).T, (self.q, self.scale)

    @staticmethod
    def _grad_input_operand(saved: tuple[Tensor, ...], dtype: torch.dtype, plan: LinearPlan):
        return QuantizedOperand(*saved)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return (self.q.float() * self.scale).to(dtype or self.dtype)

    def _update_(self, fn) -> None:
        raise RuntimeError("an un-sharded FP8 weight is rebuilt every all-gather; update the sharded master weight")

    def _to(self, device, dtype):
        return Fp8GatheredWeight(self.q.to(device=device), self.scale.to(device=device), dtype or self.dtype,
                                 self.config)

    def _new_zeros(self, size, device):
        raise RuntimeError("an un-sharded FP8 weight cannot be re-sharded; shard the master weight")
