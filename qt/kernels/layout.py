"""INT8 or FP8 codes copied into the other memory layout, in one Triton kernel.

A matmul reads its INT8 operands fastest with the dimension it reduces contiguous, and the same codes can serve
two matmuls that reduce over different dimensions: a linear's forward quantizes X by rows (output = X @ W.T
reduces over in_features), and with `LinearPlan.grad_weight_sees_quantized_input` grad_weight (dY.T @ X, which
reduces over tokens) takes those codes, column-major. Inductor generates that copy as a pointwise kernel, which
ran at ~0.3 TB/s on an H100 for int8 (docs/benchmarks.md, round 8: 33 ms a TinyLlama step); this kernel copies
tiles, each read along its rows and written along its columns.

The op is a ``torch.library.triton_op``, so torch.compile calls the kernel from its generated code. CPU tensors
(and ``QT_KERNEL_BACKEND=torch``) copy with torch ops. FP8 codes go through the same kernel as int8 bits.
"""

import torch
from torch import Tensor

from qt.kernels.backend import eager_launch, traced, use_triton

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton
except ImportError:  # qt must still import, and fall back to torch, where Triton is not installed.
    triton = None

# Tile rows x columns and warps, from scripts/bench_kernels.py --column_major_configs on an H200 (docs/kernels.md,
# round 11): 21.9 us for 16384 x 2048 (3.1 TB/s) and 52.3 us for 16384 x 5632, against Inductor's copy's 30.2 and
# 82.5; the best of 21 settings within 4% at both shapes.
_BLOCK_ROWS, _BLOCK_COLS, _WARPS = 64, 128, 4


CODE_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)


def to_column_major(q: Tensor) -> Tensor:
    """The int8 or FP8 matrix ``q`` [R, C] (any strides) laid out column-major, strides (1, R): the same values,
    with each column contiguous. ``q`` itself where it is laid out so already."""
    if q.dtype not in CODE_DTYPES or q.dim() != 2:
        raise ValueError(f"to_column_major: q must be a 2-D tensor of int8 or FP8 codes, got {q.dtype} "
                         f"{list(q.shape)}")
    if q.t().is_contiguous():
        return q
    if q.dtype != torch.int8:  # the same bytes
        return to_column_major(q.view(torch.int8)).view(q.dtype)
    if traced(q):
        return torch.ops.qt.to_column_major(q)
    with eager_launch():
        return _to_column_major(q)


def _empty_column_major(q: Tensor) -> Tensor:
    return torch.empty((q.shape[1], q.shape[0]), dtype=q.dtype, device=q.device).t()


def _to_column_major(q: Tensor) -> Tensor:
    if not use_triton(q, triton is not None) or q.numel() == 0:
        return q.t().contiguous().t()
    out = _empty_column_major(q)
    n_rows, n_cols = q.shape
    wrap_triton(_to_column_major_kernel)[(triton.cdiv(n_rows, _BLOCK_ROWS), triton.cdiv(n_cols, _BLOCK_COLS))](
        q, out, n_rows, n_cols, q.stride(0), q.stride(1), BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLS=_BLOCK_COLS,
        num_warps=_WARPS)
    return out


if triton is not None:
    torch.library.triton_op("qt::to_column_major", _to_column_major, mutates_args=())

    @triton.jit
    def _to_column_major_kernel(q_ptr, out_ptr, n_rows, n_cols, stride_q_row, stride_q_col,
                                BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """Copies one tile: Triton lays out the load along q's contiguous dimension and the store along the
        output's, and moves the tile between the two through shared memory."""
        row_start, col_start = tl.program_id(0) * BLOCK_ROWS, tl.program_id(1) * BLOCK_COLS
        r, c = tl.arange(0, BLOCK_ROWS), tl.arange(0, BLOCK_COLS)
        in_bounds = ((row_start + r)[:, None] < n_rows) & ((col_start + c)[None, :] < n_cols)
        q_tile = q_ptr + row_start.to(tl.int64) * stride_q_row + col_start.to(tl.int64) * stride_q_col
        values = tl.load(q_tile + r[:, None] * stride_q_row + c[None, :] * stride_q_col, mask=in_bounds)
        out_tile = out_ptr + col_start.to(tl.int64) * n_rows + row_start
        # 64-bit: a column's offset within the tile (c * n_rows) passes 2**31 for 2**24 rows.
        tl.store(out_tile + c[None, :].to(tl.int64) * n_rows + r[:, None], values, mask=in_bounds)
else:
    torch.library.custom_op("qt::to_column_major", _to_column_major, mutates_args=())
    torch.library.register_fake("qt::to_column_major")(_empty_column_major)
