"""The quantized linear every recipe runs: one autograd function driven by a per-matmul plan.

A linear's three matmuls, with the dimension each reduces:

    output      = X  @ W.T    reduces over in_features
    grad_input  = dY @ W      reduces over out_features
    grad_weight = dY.T @ X    reduces over tokens

A `LinearPlan` says, for each, whether it runs in the compute dtype or as a dynamically quantized INT8 or
FP8 matmul, and how: each operand is scaled along the dimension the matmul keeps (row-wise; FP8 also offers
one scale per operand, tensor-wise), so the scales factor out of the sum into the kernel's epilogue, and is
laid out with the reduced dimension contiguous (grad_weight's dY may instead take a scale per output feature per 128
tokens, which the INT8 kernel applies per K step). The activation side (X, dY) is quantized here; the weight side
comes from the recipe's weight class, which stores the weight its own way (a high-precision master, INT8 rows,
a latent ternary weight) and hands out the operands a plan asks for (`quantize_operand` quantizes a master
for any plan). So a recipe is a plan plus a weight class.

The output gradient dY, which both backward matmuls need quantized (along different axes), is quantized both
ways by one INT8 op that shares its reads of dY (FP8 casts are torch ops, which torch.compile fuses itself;
with one scale for the whole tensor, dY is cast once and its codes transposed for the other layout; with row-wise
scales, its maxima along both axes come from one kernel).
X and W are saved as they are, not as quantized copies: the linears that share an input (q/k/v, gate/up) then
share its saved copy, and the peak memory stays below BF16's; each is quantized where its matmul runs. The
forward's row-wise pass over each keeps the abs-maxima the backward's column-wise one needs, saved beside it (INT8:
each column's; FP8 tensor-wise: the tensor's), which spares the backward an abs-max pass over each. The exception
is `LinearPlan.grad_weight_sees_quantized_input`, which saves X's codes from the forward in its place.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from qt.kernels import (quantize_fp8, quantize_int8, quantize_int8_rows_and_cols, quantize_int8_rows_keeping_col_amax,
                        scaled_fp8_mm, scaled_int8_mm, to_column_major)
from qt.kernels.fp8 import E4M3, FP8_DTYPES, SCALINGS, abs_max
from qt.kernels.quantize import quantize_fp8_rows_and_cols

FORMATS = (None, "int8", "fp8")


@dataclasses.dataclass(frozen=True)
class MatmulPlan:
    """How one matmul runs.

    `format`: None for the compute dtype, "int8" or "fp8" for a dynamically quantized matmul (abs-max scales).
    `stochastic_rounding` (INT8): round its quantized operands stochastically (unbiased, noisier).
    `scaling`: "rowwise" (a scale per row of the left operand and per column of the right one) or, FP8 only,
    "tensorwise" (one scale per operand).
    `grad_dtype` (FP8): the FP8 dtype of the output gradient dY, the left operand of grad_input and grad_weight
    (the output matmul has none); X and W are always E4M3, the format with more precision.
    `power_of_two_scales` (FP8): round each scale up to a power of two (scaling then loses no precision).
    `fast_accumulation` (FP8): let the FP8 kernel accumulate in its faster, less precise mode.
    `k_block_scales` (INT8; grad_weight only, see LinearPlan): scale the left operand per row per K_BLOCK (128)
    elements of K instead of per row: grad_weight's dY.T per output feature per 128 tokens, each block of tokens
    scaled to its own abs-max, where one scale over all tokens lets a few large gradients (attention's q/k) round
    the others coarsely. The right operand keeps a scale per column.
    """

    format: str | None = None
    stochastic_rounding: bool = False
    scaling: str = "rowwise"
    grad_dtype: torch.dtype = E4M3
    power_of_two_scales: bool = False
    fast_accumulation: bool = False
    k_block_scales: bool = False

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"MatmulPlan format {self.format!r}: use one of {FORMATS}")
        if self.stochastic_rounding and not self.int8:
            raise ValueError("MatmulPlan: stochastic_rounding needs a quantized format, and is implemented for INT8")
        if self.k_block_scales and not self.int8:
            raise ValueError("MatmulPlan: k_block_scales is implemented for INT8")
        if self.scaling not in SCALINGS:
            raise ValueError(f"MatmulPlan scaling {self.scaling!r}: use one of {SCALINGS}")
        if self.grad_dtype not in FP8_DTYPES:
            raise ValueError(f"MatmulPlan grad_dtype {self.grad_dtype}: use one of {FP8_DTYPES}")
        fp8_options = {"scaling": self.scaling != "rowwise", "grad_dtype": self.grad_dtype != E4M3,
                       "power_of_two_scales": self.power_of_two_scales, "fast_accumulation": self.fast_accumulation}
        if not self.fp8 and any(fp8_options.values()):
            raise ValueError(f"MatmulPlan: {', '.join(k for k, v in fp8_options.items() if v)} needs format 'fp8'")

    @property
    def quantized(self) -> bool:
        return self.format is not None

    @property
    def int8(self) -> bool:
        return self.format == "int8"

    @property
    def fp8(self) -> bool:
        return self.format == "fp8"


HIGH_PRECISION = MatmulPlan()


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    """The plan of a linear's three matmuls.

    `grad_weight_sees_quantized_input`: grad_weight uses X as the output matmul quantized it, saved for the backward
    in its place (one byte an element), instead of X:
    - with a high-precision grad_weight (INT8 output): dY.T @ dequantized X, BitNet's straight-through estimator;
    - with a grad_weight quantized in the output's format, row-wise: X's codes themselves. They hold a scale per
      token, along the dimension grad_weight reduces, so the scales are folded into dY instead: dY.T @ X ~
      (s * dY).T @ X_q, with s * dY quantized by columns as dY would be (in the same pass for INT8). This spares
      the forward the fold of X's column abs-maxima and the backward X's column-wise quantization (a read of X)
      for a copy of its codes into the column-major layout (`qt.kernels.layout`);
    - with FP8 tensor-wise scales alike in both: X's codes and their one scale, the same numbers as casting X again
      with the abs-max the forward took (a transpose of the codes instead of a cast of X)."""

    output: MatmulPlan = HIGH_PRECISION
    grad_input: MatmulPlan = HIGH_PRECISION
    grad_weight: MatmulPlan = HIGH_PRECISION
    grad_weight_sees_quantized_input: bool = False

    def __post_init__(self):
        if self.grad_weight_sees_quantized_input and not (
                (self.output.int8 and not self.grad_weight.quantized)
                or (self.output.quantized and self.grad_weight.format == self.output.format
                    and self.output.scaling == self.grad_weight.scaling == "rowwise")
                or _tensorwise_fp8_alike(self.output, self.grad_weight, "activation")):
            raise ValueError("LinearPlan: grad_weight_sees_quantized_input needs a quantized output and either a "
                             "high-precision grad_weight (INT8 output) or a grad_weight of the output's format, both "
                             "scaled row-wise or both FP8 tensor-wise alike")
        if self.output.grad_dtype != E4M3:
            raise ValueError("LinearPlan: the output matmul has no gradient operand; give grad_dtype to the "
                             "grad_input and grad_weight plans")
        if self.output.k_block_scales or self.grad_input.k_block_scales:
            raise ValueError("LinearPlan: k_block_scales is for grad_weight, whose K is the tokens (dY is quantized "
                             "by columns there)")


class QuantizedOperand(NamedTuple):
    """A quantized matmul operand: INT8 or FP8 values `q` with the reduced dimension contiguous, and their
    scales along the kept dimension ([M, 1] for a left operand, [1, N] for a right one, or one element for the
    whole operand), such that `q * scale` approximates the operand; or an INT8 left operand's scales per row per
    128 elements of K ([M, ceil(K / 128)], `MatmulPlan.k_block_scales`)."""

    q: Tensor
    scale: Tensor

    @property
    def T(self) -> "QuantizedOperand":
        return QuantizedOperand(self.q.T, self.scale.T)


Int8Operand = QuantizedOperand  # the name the INT8 recipes use


def quantize_operand(t: Tensor, axis: int, matmul: MatmulPlan, kind: str, amax: Tensor | None = None,
                     row_multipliers: Tensor | None = None) -> QuantizedOperand:
    """`t` [R, C] quantized for the (quantized) `matmul`, reducing `axis` (1: a left operand, 0: a right one, or
    grad_weight's dY, whose transpose is its left operand). `kind` is the operand's role, "activation", "weight" or
    "gradient": it picks the FP8 dtype, and grad_weight's gradient takes the plan's `k_block_scales`. `amax`: what
    `quantize_rows_keeping_amax` kept of `t` for this matmul (the abs-max of all of `t` for FP8 tensor-wise scales, of
    each of its columns for INT8 and axis 0). `row_multipliers` [R, 1] (axis 0): quantize `t` with each row multiplied
    by its number, in float32."""
    if matmul.int8:
        k_blocks = matmul.k_block_scales and kind == "gradient"
        return QuantizedOperand(*quantize_int8(t, axis, matmul.stochastic_rounding, row_multipliers, amax, k_blocks))
    if row_multipliers is not None:
        t = t.float() * row_multipliers.float()
    return QuantizedOperand(*quantize_fp8(t, axis, _fp8_dtype(matmul, kind), matmul.scaling,
                                          matmul.power_of_two_scales, amax))


def _fp8_dtype(matmul: MatmulPlan, kind: str) -> torch.dtype:
    return matmul.grad_dtype if kind == "gradient" else E4M3


def _tensorwise_fp8_alike(first: MatmulPlan, second: MatmulPlan, kind: str) -> bool:
    """Whether both matmuls cast a `kind` operand to the same FP8 codes with one scale for the whole tensor: the
    abs-max and the codes of one then serve the other, whatever the layout."""
    return (first.fp8 and second.fp8 and first.scaling == second.scaling == "tensorwise"
            and _fp8_dtype(first, kind) == _fp8_dtype(second, kind)
            and first.power_of_two_scales == second.power_of_two_scales)


def quantize_rows_keeping_amax(t: Tensor, first: MatmulPlan, later: MatmulPlan,
                               kind: str) -> tuple[QuantizedOperand, Tensor | None]:
    """`t` quantized by rows for the (quantized) `first` matmul, and what the `later` matmul's quantization of `t` by
    columns can reuse of that pass (else None), for `quantize_operand` to take: where both are INT8, the abs-max of
    each column of `t`, folded in the same read of `t`; where both scale `t` tensor-wise alike in FP8, the abs-max of
    all of `t`. A linear keeps X's from the forward for grad_weight, and a master weight its own for grad_input (a
    float32 number per column at most), which spares the backward an abs-max pass over each."""
    if first.int8 and later.int8:
        q, scale, col_amax = quantize_int8_rows_keeping_col_amax(t, first.stochastic_rounding)
        return QuantizedOperand(q, scale), col_amax
    amax = abs_max(t, None) if _tensorwise_fp8_alike(first, later, kind) else None
    return quantize_operand(t, 1, first, kind, amax), amax


def _quantize_operand_pair(t: Tensor, rows: MatmulPlan | None, cols: MatmulPlan | None,
                           col_row_multipliers: Tensor | None = None):
    """The gradient `t` [R, C] quantized per row for the `rows` matmul and per column for the `cols` matmul
    (either may be None: not needed), the latter with each row of `t` multiplied by `col_row_multipliers` [R, 1]
    where given. One op when both are INT8 and round alike (and the columns take no scales per block of rows, which
    a pass of their own finds as it reads t); with FP8 row-wise scales, the abs-maxima along both axes
    in one read; one FP8 cast, transposed for the other layout, when both scale it tensor-wise alike."""
    if (rows and cols and rows.int8 and cols.int8 and rows.stochastic_rounding == cols.stochastic_rounding
            and not cols.k_block_scales):
        q_rows, row_scale, q_cols, col_scale = quantize_int8_rows_and_cols(t, rows.stochastic_rounding,
                                                                           col_row_multipliers)
        return QuantizedOperand(q_rows, row_scale), QuantizedOperand(q_cols, col_scale)
    if rows and cols and rows.fp8 and cols.fp8 and rows.scaling == cols.scaling == "rowwise":
        # qt's kernels, as for INT8: by rows keeping the columns' maxima, then by columns (two reads of t).
        q_rows, row_scale, q_cols, col_scale = quantize_fp8_rows_and_cols(
            t, _fp8_dtype(rows, "gradient"), _fp8_dtype(cols, "gradient"), rows.power_of_two_scales,
            cols.power_of_two_scales, col_row_multipliers)
        return QuantizedOperand(q_rows, row_scale), QuantizedOperand(q_cols, col_scale)
    if rows and cols and _tensorwise_fp8_alike(rows, cols, "gradient"):
        # Transposing the 1-byte codes moves 2 bytes an element; a second cast would read t (2 bytes) twice more.
        # torch's copy here, which Inductor may fuse with the cast that writes q_rows (to_column_major, an opaque
        # kernel, could not be fused; not timed against it).
        q_rows = quantize_operand(t, 1, rows, "gradient")
        return q_rows, QuantizedOperand(q_rows.q.t().contiguous().t(), q_rows.scale)
    return (quantize_operand(t, 1, rows, "gradient") if rows else None,
            quantize_operand(t, 0, cols, "gradient", row_multipliers=col_row_multipliers) if cols else None)


def planned_matmul(a: Tensor | QuantizedOperand, b: Tensor | QuantizedOperand, dtype: torch.dtype,
                   matmul: MatmulPlan) -> Tensor:
    """a @ b in `dtype`, as the `matmul` plan says (quantized operands for an INT8 or FP8 matmul)."""
    if matmul.int8:
        return scaled_int8_mm(a.q, b.q, a.scale, b.scale, dtype)
    if matmul.fp8:
        return scaled_fp8_mm(a.q, b.q, a.scale, b.scale, dtype, matmul.fast_accumulation)
    return a @ b


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight, bias: Tensor | None, plan: LinearPlan, dtype: torch.dtype):
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        w_operand, w_saved = weight._forward_operands(dtype, plan)
        with torch.autocast(x.device.type, enabled=False):
            # With X's codes saved, grad_weight quantizes nothing of X: nothing to keep for it.
            later = HIGH_PRECISION if plan.grad_weight_sees_quantized_input else plan.grad_weight
            x_rows, x_amax = (quantize_rows_keeping_amax(x2d, plan.output, later, "activation")
                              if plan.output.quantized else (x2d, None))
            out = planned_matmul(x_rows, w_operand, dtype, plan.output)
        if bias is not None:
            out = out + bias.to(dtype)
        # X itself is saved, not a quantized copy: the linears that share an input (q/k/v, gate/up) share it.
        if plan.grad_weight_sees_quantized_input:
            x_saved = tuple(x_rows)
        else:
            x_saved = (x2d,) if x_amax is None else (x2d, x_amax)
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
        # X's codes in place of X; row-wise, their per-token scales go into dY's column-wise quantization (LinearPlan).
        codes_of_x = plan.grad_weight_sees_quantized_input and plan.grad_weight.quantized
        fold_x_scales = codes_of_x and plan.grad_weight.scaling == "rowwise"
        with torch.autocast(dy.device.type, enabled=False):
            dy_rows, dy_cols = _quantize_operand_pair(
                dy, plan.grad_input if need_x and plan.grad_input.quantized else None,
                plan.grad_weight if need_w and plan.grad_weight.quantized else None,
                x_saved[1] if fold_x_scales else None)
            if need_x:
                dy_for_input = dy_rows if plan.grad_input.quantized else dy
                grad_x = ctx.weight_type._grad_input(w_saved, dy_for_input, dtype, plan)
                grad_x = grad_x.view(*grad_output.shape[:-1], ctx.in_features)
            if need_w:
                if codes_of_x:
                    x_q, x_scale = x_saved
                    # Row-wise, the scales went into dY; the codes' own are ones, along the dimension grad_weight keeps.
                    scale = x_scale.new_ones(1, x_q.shape[1]) if fold_x_scales else x_scale
                    x_q = to_column_major(x_q)
                    grad_w = planned_matmul(dy_cols.T, QuantizedOperand(x_q, scale), dtype, plan.grad_weight)
                elif plan.grad_weight.quantized:
                    x_amax = x_saved[1] if len(x_saved) > 1 else None
                    x_cols = quantize_operand(x_saved[0], 0, plan.grad_weight, "activation", x_amax)
                    grad_w = planned_matmul(dy_cols.T, x_cols, dtype, plan.grad_weight)
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
    weight (a `qt.subclass.QuantizedWeight` implementing `_forward_operands` / `_grad_input_operand`, or
    `_grad_input`)."""
    return _QuantizedLinear.apply(x, weight, bias, plan, dtype)
