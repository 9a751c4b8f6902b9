"""Symmetric abs-max INT8 quantization of a 2-D tensor along one axis, in one fused kernel.

``quantize_int8(x, axis)`` reduces ``x`` over ``axis`` and keeps one scale per slice along the other
axis: ``axis=1`` gives one scale per row, ``axis=0`` one per column. The int8 result is laid out with
the reduced axis contiguous, which is the K-contiguous layout ``scaled_int8_mm`` is fastest on.

Both axes share one kernel, which quantizes the rows of a [rows, cols] view: ``x`` itself for
``axis=1`` and ``x.t()`` for ``axis=0``. Writing that view's rows into a row-major buffer is exactly
the transposed layout ``axis=0`` asks for, so the transpose happens in the kernel's store.
"""

import torch
from torch import Tensor

from qt.kernels.backend import traced, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # qt must still import, and fall back to torch, where Triton is not installed.
    triton = None

QUANT_MAX = 127
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_int8(x: Tensor, axis: int, stochastic_rounding: bool = False) -> tuple[Tensor, Tensor]:
    """Quantizes ``x`` to int8 with one abs-max scale per slice along the axis that is not reduced.

    Args:
        x: float32, bfloat16 or float16 [R, C], any strides.
        axis: the axis reduced to find each abs-max: 1 gives one scale per row, 0 one per column.
        stochastic_rounding: round up with probability equal to the fractional part (unbiased)
            instead of to the nearest integer. The random numbers come from torch's generator on
            ``x.device``, so ``torch.manual_seed`` reproduces them.

    Returns:
        ``(q, scale)``: ``q`` int8 [R, C] with the reduced axis contiguous (strides (C, 1) for
        ``axis=1``, (1, R) for ``axis=0``) and ``scale`` of ``x.dtype`` with the reduced axis kept
        as size 1 ([R, 1] or [1, C]), such that ``q * scale`` approximates ``x``.
    """
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_int8: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"quantize_int8: x must be 2-D, got shape {list(x.shape)}; reshape it to [rows, cols] first")
    if axis not in (0, 1):
        raise ValueError(f"quantize_int8: axis must be 0 (one scale per column) or 1 (one scale per row), got {axis}")
    # The seed is drawn here, as a device tensor, so the op itself stays a pure function of its inputs
    # (which torch.compile and opcheck rely on) and drawing it needs no host sync.
    seed = torch.randint(0, 2**31 - 1, (1,), device=x.device) if stochastic_rounding else None
    # The custom op is what torch.compile traces; eager calls skip its dispatch (tens of µs a call).
    if traced(x):
        return torch.ops.qt.quantize_int8(x, axis, seed)
    return _quantize_int8_impl(x, axis, seed)


def _quantize_int8_impl(x: Tensor, axis: int, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    if use_triton(x, triton is not None):
        return triton_quantize_int8(x, axis, seed)
    return _torch_quantize_int8(x, axis, seed)


_quantize_int8_op = torch.library.custom_op("qt::quantize_int8", _quantize_int8_impl, mutates_args=())


@_quantize_int8_op.register_fake
def _(x: Tensor, axis: int, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    return _empty_outputs(x, axis)


def _empty_outputs(x: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """Allocates ``(q, scale)`` in the documented layout; shared by every path so their strides agree."""
    rows, cols = x.shape
    if axis == 1:
        q = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
        scale = torch.empty((rows, 1), dtype=x.dtype, device=x.device)
    else:
        q = torch.empty_strided((rows, cols), (1, rows), dtype=torch.int8, device=x.device)
        scale = torch.empty((1, cols), dtype=x.dtype, device=x.device)
    return q, scale


def _as_rows(t: Tensor, axis: int) -> Tensor:
    """The view whose rows are the slices that ``axis`` reduces: the kernel's [rows, cols] frame."""
    return t if axis == 1 else t.t()


def _min_amax(dtype: torch.dtype) -> float:
    # The floor keeps the scale of an all-zero slice positive, so 0 / scale is 0 and not NaN. 1e-12 / 127
    # underflows to zero in float16, so there the floor is raised to give its smallest subnormal scale.
    smallest_subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return max(1e-12, QUANT_MAX * smallest_subnormal)


def _torch_quantize_int8(x: Tensor, axis: int, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    q, scale = _empty_outputs(x, axis)
    x_rows = _as_rows(x, axis).float()
    amax = x_rows.abs().amax(dim=1, keepdim=True).clamp(min=_min_amax(x.dtype))
    scale_rows = (amax / QUANT_MAX).to(x.dtype)
    scaled = x_rows / scale_rows.float()
    if seed is None:
        rounded = torch.round(scaled)
    else:
        generator = torch.Generator(device=x.device).manual_seed(int(seed.item()))
        rounded = torch.floor(scaled + torch.rand(scaled.shape, generator=generator, device=x.device))
    _as_rows(q, axis).copy_(rounded.clamp(-QUANT_MAX, QUANT_MAX))
    _as_rows(scale, axis).copy_(scale_rows)
    return q, scale


def triton_quantize_int8(x: Tensor, axis: int, seed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Launches the Triton kernel on an input already checked by ``quantize_int8``.

    ``seed`` (a 1-element int64 tensor on ``x.device``) turns on stochastic rounding. Public so tests
    can run the kernel on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    q, scale = _empty_outputs(x, axis)
    x_rows = _as_rows(x, axis)
    q_rows = _as_rows(q, axis)
    n_rows, n_cols = x_rows.shape
    # 16 rows per program still give C / 16 programs for axis=0 (128 for C = 2048: about one per SM on an
    # H100); 1024 columns per step keep 32 KB of bf16 loads in flight per program.
    block_rows, block_cols = 16, 1024
    _quantize_rows_kernel[(triton.cdiv(n_rows, block_rows),)](
        x_rows, q_rows, scale, seed,
        n_rows, n_cols,
        x_rows.stride(0), x_rows.stride(1), q_rows.stride(0),
        _min_amax(x.dtype),
        STOCHASTIC=seed is not None,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        num_warps=8,
    )  # fmt: skip
    return q, scale


if triton is not None:

    @triton.jit
    def _round_half_to_even(v):
        # libdevice's rint would do, but the interpreter cannot run libdevice calls.
        floor = tl.floor(v)
        frac = v - floor
        floor_is_odd = (floor.to(tl.int32) & 1) != 0
        round_up = (frac > 0.5) | ((frac == 0.5) & floor_is_odd)
        return tl.where(round_up, floor + 1, floor)

    @triton.jit
    def _round_to_bfloat16(v):
        """Rounds positive finite fp32 values to the nearest bfloat16 (ties to even), kept in fp32.

        A plain ``.to(tl.bfloat16)`` rounds this way on the GPU, but Triton's interpreter truncates,
        which would make the CPU tests disagree with torch; after this the cast is exact on both.
        """
        bits = v.to(tl.uint32, bitcast=True)
        lowest_kept_bit = (bits >> 16) & 1
        bits = (bits + 0x7FFF + lowest_kept_bit) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _load_block(x_row_ptrs, row_in_bounds, cols, n_cols, stride_x_col):
        """Loads x[rows, cols] as fp32 (0 outside x), with the mask of the elements inside x."""
        in_bounds = row_in_bounds[:, None] & (cols[None, :] < n_cols)
        # int64: with axis=0 the columns here are the rows of x, and row * row stride can pass 2**31.
        x = tl.load(x_row_ptrs + cols[None, :].to(tl.int64) * stride_x_col, mask=in_bounds, other=0.0)
        return x.to(tl.float32), in_bounds

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr, q_ptr, scale_ptr, seed_ptr,
        n_rows, n_cols,
        stride_x_row, stride_x_col, stride_q_row,
        min_amax,
        STOCHASTIC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    ):  # fmt: skip
        """Quantizes BLOCK_ROWS whole rows of x (any strides) into rows of q (contiguous within a row)."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_in_bounds = rows < n_rows
        x_row_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x_row
        q_row_ptrs = q_ptr + rows[:, None].to(tl.int64) * stride_q_row

        amax = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for col_start in range(0, n_cols, BLOCK_COLS):
            cols = col_start + tl.arange(0, BLOCK_COLS)
            x, _ = _load_block(x_row_ptrs, row_in_bounds, cols, n_cols, stride_x_col)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))

        # Quantize with the scale as stored (rounded to x's dtype), so q * scale is what the kernel meant.
        scale = tl.div_rn(tl.maximum(amax, min_amax), 127.0)
        if scale_ptr.dtype.element_ty == tl.bfloat16:
            scale = _round_to_bfloat16(scale)
        scale = scale.to(scale_ptr.dtype.element_ty)
        tl.store(scale_ptr + rows, scale, mask=row_in_bounds)
        scale = scale.to(tl.float32)
        if STOCHASTIC:
            seed = tl.load(seed_ptr)

        # Second read of x: a whole row (up to all R rows of x when axis=0) need not fit on chip, so the
        # abs-max pass cannot keep it. For row-wise blocks the re-read mostly hits L2.
        for col_start in range(0, n_cols, BLOCK_COLS):
            cols = col_start + tl.arange(0, BLOCK_COLS)
            x, in_bounds = _load_block(x_row_ptrs, row_in_bounds, cols, n_cols, stride_x_col)
            scaled = tl.div_rn(x, scale[:, None])
            if STOCHASTIC:
                # Rounds up with probability frac(scaled). The element's index in the output keys its
                # random number, so no two elements share one.
                random_offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
                rounded = tl.floor(scaled + tl.rand(seed, random_offsets))
            else:
                rounded = _round_half_to_even(scaled)
            q = tl.minimum(tl.maximum(rounded, -127.0), 127.0)
            tl.store(q_row_ptrs + cols[None, :], q.to(tl.int8), mask=in_bounds)
