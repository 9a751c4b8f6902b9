"""INT8 mixed precision: high-precision master weights, INT8 matmuls.

Each of a linear's three matmuls can run as a dynamically quantized INT8 matmul:

    output      = X  @ W.T    reduces over in_features   X row-wise,   W row-wise
    grad_input  = dY @ W      reduces over out_features  dY row-wise,  W column-wise
    grad_weight = dY.T @ X    reduces over tokens        dY column-wise, X column-wise

Each operand is scaled along the dimension the matmul keeps (so the scales factor out of the sum
into the kernel's epilogue) and `quantize_int8` lays it out with the reduced dimension contiguous,
which is the fast layout for the INT8 kernel; the transposes below are views, never copies.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qt.config import RecipeConfig
from qt.kernels import quantize_int8, scaled_int8_mm
from qt.subclass import QuantizedWeight, compute_dtype


@dataclasses.dataclass(frozen=True)
class Int8MixedPrecisionConfig(RecipeConfig):
    """`output`, `grad_input`, `grad_weight`: which matmuls run in INT8 (the others run in the
    compute dtype). `stochastic_rounding`: round every quantized operand stochastically (unbiased
    matmuls, at the cost of more noise per step)."""

    name = "int8_mixed_precision"
    output: bool = True
    grad_input: bool = True
    grad_weight: bool = True
    stochastic_rounding: bool = False

    def quantize_weight(self, weight: Tensor) -> Tensor:
        return Int8MixedPrecisionWeight(weight, self)


def int8_matmul(a: Tensor, b: Tensor, stochastic_rounding: bool = False) -> Tensor:
    """`a @ b` as a dynamically quantized INT8 matmul: `a` scaled per row, `b` per column."""
    a_q, a_scale = quantize_int8(a, 1, stochastic_rounding)
    b_q, b_scale = quantize_int8(b, 0, stochastic_rounding)
    return scaled_int8_mm(a_q, b_q, a_scale, b_scale)


class _Int8MixedPrecisionLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: "Int8MixedPrecisionWeight", bias: Tensor | None):
        config = weight.config
        dtype = compute_dtype(x)
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        w = weight.master.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if config.output:
                out = int8_matmul(x2d, w.T, config.stochastic_rounding)
            else:
                out = x2d @ w.T
        if bias is not None:
            out = out + bias.to(dtype)
        ctx.save_for_backward(x2d, weight.master)
        ctx.has_bias = bias is not None
        ctx.config = config
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x2d, master = ctx.saved_tensors
        config = ctx.config
        dy = grad_output.reshape(-1, grad_output.shape[-1]).to(x2d.dtype)
        w = master.to(x2d.dtype)
        grad_x = grad_w = grad_b = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                if config.grad_input:
                    grad_x = int8_matmul(dy, w, config.stochastic_rounding)
                else:
                    grad_x = dy @ w
                grad_x = grad_x.view(*grad_output.shape[:-1], w.shape[1])
            if ctx.needs_input_grad[1]:
                if config.grad_weight:
                    grad_w = int8_matmul(dy.T, x2d, config.stochastic_rounding)
                else:
                    grad_w = dy.T @ x2d
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = dy.sum(0)
        return grad_x, grad_w, grad_b


class Int8MixedPrecisionWeight(QuantizedWeight):
    """A high-precision master weight whose linear runs in INT8. The master copy is exact, so
    optimizers, `state_dict`, `.to()` and `clone` see an ordinary tensor."""

    _inner_names = ("master",)

    @staticmethod
    @torch._dynamo.disable
    def __new__(cls, master: Tensor, config: Int8MixedPrecisionConfig):
        return QuantizedWeight._wrapper(cls, master, master.dtype)

    @torch._dynamo.disable
    def __init__(self, master: Tensor, config: Int8MixedPrecisionConfig):
        self.master = master
        self.config = config

    def _metadata(self):
        return (self.config,)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.master if dtype is None else self.master.to(dtype)

    def _update_(self, fn) -> None:
        fn(self.master)

    def _to(self, device, dtype):
        return Int8MixedPrecisionWeight(self.master.to(device=device, dtype=dtype), self.config)

    def _new_zeros(self, size, device):
        return Int8MixedPrecisionWeight(self.master.new_zeros(size, device=device), self.config)

    @staticmethod
    def _linear(x: Tensor, weight: "Int8MixedPrecisionWeight", bias: Tensor | None) -> Tensor:
        return _Int8MixedPrecisionLinear.apply(x, weight, bias)

    # FSDP2: all-gather the master shard (in FSDP's param dtype when it has one) and wrap it.
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        dtype = mp_policy.param_dtype or self.master.dtype
        return (self.master.to(dtype),), None

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        (master,) = outputs
        if out is not None:  # FSDP re-filled the storage of `out.master` in place
            return None
        return Int8MixedPrecisionWeight(master, self.config), (master,)
