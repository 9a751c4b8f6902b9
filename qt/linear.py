"""The quantized linear every recipe runs: one autograd function driven by a per-matmul plan.

A linear's three matmuls, with the dimension each reduces:

    output      = X  @ W.T    reduces over in_features
    grad_input  = dY @ W      reduces over out_features
    grad_weight = dY.T @ X    reduces over tokens

A `LinearPlan` says, for each, whether it runs in the compute dtype or as a dynamically quantized INT8
matmul (each operand scaled along the dimension the matmul keeps, so the scales factor out of the sum
into the kernel's epilogue, and laid out with the reduced dimension contiguous), and how it rounds.
The activation side (X, dY) is quantized here; the weight side comes from the recipe's weight class,
which stores the weight its own way (a high-precision master, INT8 rows, a latent ternary weight) and
hands out the operands a plan asks for. So a recipe is a plan plus a weight class.

The output gradient dY, which both backward matmuls need quantized (along different axes), is
quantized both ways by one op that shares the abs-max pass. X and W are saved as they are, not as quantized copies: the
linears that share an input (q/k/v, gate/up) then share its saved copy, and the peak memory stays
below BF16's; each is quantized where its matmul runs.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from qt.kernels import quantize_int8_rows_and_cols, scaled_int8_mm
from qt.kernels.quantize import quantize_activation_int8

FORMATS = (None, "int8")


@dataclasses.dataclass(frozen=True)
class MatmulPlan:
    """How one matmul runs. `format`: None for the compute dtype, "int8" for a dynamically quantized
    INT8 matmul (row-/column-wise abs-max scales). `stochastic_rounding`: round its quantized operands
    stochastically (unbiased, noisier)."""

    format: str | None = None
    stochastic_rounding: bool = False

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"MatmulPlan format {self.format!r}: use one of {FORMATS}")
        if self.stochastic_rounding and self.format is None:
            raise ValueError("MatmulPlan: stochastic_rounding needs a quantized format")

    @property
    def int8(self) -> bool:
        return self.format == "int8"


HIGH_PRECISION = MatmulPlan()


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    """The plan of a linear's three matmuls. `grad_weight_sees_quantized_input`: a high-precision
    grad_weight uses X as the forward quantized it (BitNet's straight-through estimator) instead of X."""

    output: MatmulPlan = HIGH_PRECISION
    grad_input: MatmulPlan = HIGH_PRECISION
    grad_weight: MatmulPlan = HIGH_PRECISION
    grad_weight_sees_quantized_input: bool = False

    def __post_init__(self):
        if self.grad_weight_sees_quantized_input and not (self.output.int8 and not self.grad_weight.int8):
            raise ValueError("LinearPlan: grad_weight_sees_quantized_input needs an INT8 output and a "
                             "high-precision grad_weight")


class Int8Operand(NamedTuple):
    """An INT8 matmul operand with the reduced dimension contiguous, and its scales along the kept
    dimension ([M, 1] for a left operand, [1, N] or one element for a right one)."""

    q: Tensor
    scale: Tensor

    @property
    def T(self) -> "Int8Operand":
        return Int8Operand(self.q.T, self.scale.T)


def _quantize_operand_pair(t: Tensor, rows: MatmulPlan | None, cols: MatmulPlan | None):
    """`t` [R, C] quantized per row for the `rows` matmul and per column for the `cols` matmul (either
    may be None: not needed). One op when both are needed and round alike."""
    if rows and cols and rows.stochastic_rounding == cols.stochastic_rounding:
        q_rows, row_scale, q_cols, col_scale = quantize_int8_rows_and_cols(t, rows.stochastic_rounding)
        return Int8Operand(q_rows, row_scale), Int8Operand(q_cols, col_scale)
    return (Int8Operand(*quantize_activation_int8(t, 1, rows.stochastic_rounding)) if rows else None,
            Int8Operand(*quantize_activation_int8(t, 0, cols.stochastic_rounding)) if cols else None)


def _matmul(a: Tensor | Int8Operand, b: Tensor | Int8Operand, dtype: torch.dtype) -> Tensor:
    if isinstance(a, Int8Operand):
        return scaled_int8_mm(a.q, b.q, a.scale, b.scale, dtype)
    return a @ b


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight, bias: Tensor | None, plan: LinearPlan, dtype: torch.dtype):
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        w_operand, w_saved = weight._forward_operands(dtype, plan)
        with torch.autocast(x.device.type, enabled=False):
            if plan.output.int8:
                x_rows = Int8Operand(*quantize_activation_int8(x2d, 1, plan.output.stochastic_rounding))
                out = _matmul(x_rows, w_operand, dtype)
            else:
                out = x2d @ w_operand
        if bias is not None:
            out = out + bias.to(dtype)
        # X itself is saved, not a quantized copy: the linears that share an input (q/k/v, gate/up) share it.
        x_saved = tuple(x_rows) if plan.grad_weight_sees_quantized_input else (x2d,)
        ctx.save_for_backward(*x_saved, *w_saved)
        ctx.n_x_saved, ctx.weight_type, ctx.plan, ctx.dtype = len(x_saved), type(weight), plan, dtype
        ctx.has_bias, ctx.in_features = bias is not None, x.shape[-1]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        saved = ctx.saved_tensors
        x_saved, w_saved = saved[: ctx.n_x_saved], saved[ctx.n_x_saved:]
        plan, dtype = ctx.plan, ctx.dtype
        dy = grad_output.reshape(-1, grad_output.shape[-1]).to(dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        with torch.autocast(dy.device.type, enabled=False):
            # dY is quantized along both axes by one op when both of its matmuls run in INT8.
            dy_rows, dy_cols = _quantize_operand_pair(
                dy, plan.grad_input if need_x and plan.grad_input.int8 else None,
                plan.grad_weight if need_w and plan.grad_weight.int8 else None)
            if need_x:
                w_operand = ctx.weight_type._grad_input_operand(w_saved, dtype, plan)
                grad_x = _matmul(dy_rows if plan.grad_input.int8 else dy, w_operand, dtype)
                grad_x = grad_x.view(*grad_output.shape[:-1], ctx.in_features)
            if need_w:
                if plan.grad_weight.int8:
                    x_cols = Int8Operand(*quantize_activation_int8(x_saved[0], 0, plan.grad_weight.stochastic_rounding))
                    grad_w = _matmul(dy_cols.T, x_cols, dtype)
                elif plan.grad_weight_sees_quantized_input:
                    x_q, x_scale = x_saved
                    grad_w = dy.T @ (x_q.to(dtype) * x_scale)
                else:
                    grad_w = dy.T @ x_saved[0]
        if ctx.has_bias and need_b:
            grad_b = dy.sum(0)
        return grad_x, grad_w, grad_b, None, None


def quantized_linear(x: Tensor, weight, bias: Tensor | None, plan: LinearPlan, dtype: torch.dtype) -> Tensor:
    """`F.linear(x, weight, bias)` computed in `dtype` the way `plan` says, with `weight` a recipe's
    weight (a `qt.subclass.QuantizedWeight` implementing `_forward_operands` / `_grad_input_operand`)."""
    return _QuantizedLinear.apply(x, weight, bias, plan, dtype)
