"""torch's fused Adam / AdamW step for a weight stored as INT8 rows with one scale per row, in one kernel.

`int8_weight_only` keeps no high-precision copy: a step dequantizes the weight, applies the update and
re-quantizes it (with stochastic rounding, so updates smaller than half a step survive on average).
Through FP32 copies that is five passes over the weight (dequantize, torch's fused step, abs-max,
quantize, copy back); here each program holds whole rows and reads the INT8 row, its scale, the
gradient and both moments once, and writes the new row, scale and moments once.

The math is torch's `_fused_adam_` / `_fused_adamw_` (FP32 arithmetic, the same order of operations),
including `grad_scale`, `found_inf` (a step with `found_inf` set leaves everything untouched), `maximize`
and a tensor `lr`; the steps (`state_steps`) are read from the device, as torch increments them before the
call. The new weight is quantized as `quantize_int8(w, 1, stochastic_rounding)` quantizes it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qt.kernels.backend import traced, use_triton
from qt.kernels.quantize import _min_amax

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Whole rows in registers: the new weight of a row must be complete before its scale is known.
MAX_ROW = 8192


def fused_step_supported(int_data: Tensor, amsgrad: bool, *moments: Tensor) -> bool:
    """Whether the kernel takes this weight's step (else the caller goes through FP32 copies, which a compiled
    optimizer step traces as torch ops)."""
    return (use_triton(int_data, triton is not None) and not traced(int_data) and not amsgrad
            and 0 < int_data.shape[1] <= MAX_ROW
            and all(t.is_contiguous() for t in (int_data, *moments)))


def int8_rows_adam_step_(int_data: Tensor, scale: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                         step: Tensor, *, lr: float | Tensor, beta1: float, beta2: float, weight_decay: float,
                         eps: float, maximize: bool, decoupled_weight_decay: bool, stochastic_rounding: bool,
                         grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """One Adam (`decoupled_weight_decay=False`) or AdamW step of the weight `int_data * scale` (int8 [R, C],
    float32 [R, 1]) in place, with contiguous moments [R, C] and `step` a one-element float tensor."""
    n_rows, n_cols = int_data.shape
    block_cols = max(triton.next_power_of_2(n_cols), 16)
    seed = torch.randint(0, 2**31 - 1, (1,), device=int_data.device) if stochastic_rounding else None
    lr_is_tensor = isinstance(lr, Tensor)
    _int8_rows_adam_kernel[(n_rows,)](
        int_data, scale, grad, exp_avg, exp_avg_sq, step, lr if lr_is_tensor else None,
        grad_scale, found_inf, seed, n_cols, grad.stride(0), grad.stride(1),
        # 1 - beta and log(beta) in float64, then rounded once (1 - float32(0.999) is 1.3e-5 off).
        0.0 if lr_is_tensor else float(lr), beta1, beta2, 1 - beta1, 1 - beta2, math.log(beta1), math.log(beta2),
        weight_decay, eps,
        MIN_AMAX=_min_amax(torch.float32), MAXIMIZE=maximize, ADAMW=decoupled_weight_decay,
        STOCHASTIC=stochastic_rounding, BLOCK_COLS=block_cols,
        num_warps=4 if block_cols <= 2048 else 8 if block_cols <= 4096 else 16,
    )  # fmt: skip


if triton is not None:
    from qt.kernels.quantize import _abs_max, _quantize_values, _scale_from_amax

    @triton.jit
    def _int8_rows_adam_kernel(
        q_ptr, scale_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, lr_ptr,
        grad_scale_ptr, found_inf_ptr, seed_ptr, n_cols, stride_grad_row, stride_grad_col,
        lr_value, beta1, beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, weight_decay, eps,
        MIN_AMAX: tl.constexpr, MAXIMIZE: tl.constexpr, ADAMW: tl.constexpr, STOCHASTIC: tl.constexpr,
        BLOCK_COLS: tl.constexpr,
    ):  # fmt: skip
        skip = False
        if found_inf_ptr is not None:
            skip = tl.load(found_inf_ptr) != 0
        if not skip:
            row = tl.program_id(0).to(tl.int64)
            cols = tl.arange(0, BLOCK_COLS)
            in_row = cols < n_cols
            offsets = row * n_cols + cols
            w = tl.load(q_ptr + offsets, mask=in_row, other=0).to(tl.float32) * tl.load(scale_ptr + row)
            grad = tl.load(grad_ptr + row * stride_grad_row + cols * stride_grad_col, mask=in_row, other=0.0)
            grad = grad.to(tl.float32)
            if grad_scale_ptr is not None:
                grad = grad / tl.load(grad_scale_ptr)
            if MAXIMIZE:
                grad = -grad
            lr = tl.load(lr_ptr).to(tl.float32) if lr_ptr is not None else lr_value
            if weight_decay != 0:
                if ADAMW:
                    w = w - lr * weight_decay * w
                else:
                    grad = grad + w * weight_decay
            step = tl.load(step_ptr)
            exp_avg = tl.load(exp_avg_ptr + offsets, mask=in_row, other=0.0).to(tl.float32)
            exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=in_row, other=0.0).to(tl.float32)
            exp_avg = beta1 * exp_avg + one_minus_beta1 * grad
            exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * grad * grad
            # Stored in the moments' dtype (a bf16 model's torch AdamW keeps bf16 moments); the update uses the
            # FP32 values, as torch's fused step does.
            tl.store(exp_avg_ptr + offsets, exp_avg.to(exp_avg_ptr.dtype.element_ty), mask=in_row)
            tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq.to(exp_avg_sq_ptr.dtype.element_ty), mask=in_row)
            # beta ** step in float64: the GPU's fast float32 exp and log are off by ulps that 1 - beta ** step
            # (~1e-3 early on) magnifies a thousandfold.
            step = step.to(tl.float64)
            bias_correction1 = (1 - tl.exp(step * log_beta1)).to(tl.float32)
            bias_correction2_sqrt = tl.sqrt((1 - tl.exp(step * log_beta2)).to(tl.float32))
            denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
            w = w - (lr / bias_correction1) * exp_avg / denom
            # Re-quantize the row: quantize_int8's math (NaN/inf give an infinite scale), with an fp32 scale.
            new_scale = _scale_from_amax(_abs_max(tl.where(in_row, w, 0.0), 0), MIN_AMAX, False, 127.0, False)
            seed = tl.load(seed_ptr) if STOCHASTIC else 0
            q = _quantize_values(w, new_scale, seed, offsets, STOCHASTIC, tl.int8, 127.0)
            tl.store(q_ptr + offsets, q, mask=in_row)
            tl.store(scale_ptr + row, new_scale)
