"""Symmetric abs-max INT8 quantization of a 2-D tensor along one axis or both, in fused kernels.

``quantize_int8(x, axis)`` reduces ``x`` over ``axis`` and keeps one scale per slice along the other
axis: ``axis=1`` gives one scale per row, ``axis=0`` one per column. The int8 result is laid out with
the reduced axis contiguous, which is the K-contiguous layout ``scaled_int8_mm`` is fastest on.
``quantize_int8_rows_keeping_col_amax(x)`` quantizes by rows and keeps each column's abs-max, which
``quantize_int8(x, 0, col_amax=...)`` takes later instead of a pass of its own: a linear quantizes X (and a
master weight) by rows in the forward and by columns in the backward. ``quantize_int8_rows_and_cols(x)`` gives
both at once: a linear's backward needs its output gradient quantized per row (for grad_input) and per column
(for grad_weight). ``quantize_int8(x, 0, k_blocks=True)`` keeps a scale per column per 128 rows instead, for
``scaled_int8_mm``'s scales per block of K (one read of x).

Two ways, picked by shape (three Triton kernels):
- whole rows: each program holds whole rows in registers (rows up to ``_MAX_WHOLE_ROW`` wide), so a
  row-wise quantize reads ``x`` once, and can fold each column's abs-max into a vector of maxima (atomics)
  in the same read;
- tiles: an abs-max pass over tiles folds each tile's into per-row and per-column maxima with atomics, then
  a pass per output re-reads the tiles and writes it, the column-wise one transposed in the store. Every
  axis and shape gets a full grid this way.
Each element is multiplied by the reciprocal of its scale and rounded to the nearest integer, ties to even
(stochastically where asked); the torch path computes the same, so the two give the same bits.

The ops are ``torch.library.triton_op``s: torch.compile sees the Triton launches themselves and calls
them from its generated code, with no Python between kernels. By default a linear's input is the exception:
compiled, its row-wise quantization is written in torch ops, which Inductor fuses into the op producing the input
(``QT_COMPILED_QUANTIZE``, ``quantize_inductor_options``). CPU tensors (and ``QT_KERNEL_BACKEND=torch``)
run the same math in torch ops, which torch.compile traces and fuses like any other.

Non-finite input is not hidden: a slice holding NaN or inf gets an infinite scale, so whatever is
computed from it (``q * scale``, the scaled matmul) is non-finite too.
"""

import os
from typing import NamedTuple

import torch
from torch import Tensor

from qt.kernels.backend import eager_launch, realize_inputs_read_by_several_kernels, traced, use_triton
from qt.kernels.fp8 import _MIN_AMAX as FP8_MIN_AMAX
from qt.kernels.fp8 import FP8_DTYPES, abs_max, quantize_fp8
from qt.kernels.int8_mm import K_BLOCK

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton
except ImportError:  # qt must still import, and fall back to torch, where Triton is not installed.
    triton = None

QUANT_MAX = 127
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Whole rows in registers up to this width (8192 fp32 values over 4 warps: 64 registers a thread).
_MAX_WHOLE_ROW = 8192


def _tile_configs() -> list:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs every config, slowly: one small tile
        return [triton.Config({"BLOCK_R": 32, "BLOCK_C": 32})]
    # The column-wise output is stored transposed: taller tiles give it longer contiguous runs.
    return [triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w)
            for r, c, w in ((64, 64, 4), (64, 128, 8), (128, 64, 8), (128, 128, 8), (32, 256, 8), (256, 32, 8))]


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scales of a ``dtype`` tensor are stored in: its own, except float16, whose range
    cannot hold the scale of small rows (1e-5 / 127 is subnormal there); those get float32."""
    return torch.float32 if dtype == torch.float16 else dtype


def _check_input(x: Tensor, name: str) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D, got shape {list(x.shape)}; reshape it to [rows, cols] first")


def _draw_seeds(x: Tensor, count: int, stochastic_rounding: bool) -> Tensor | None:
    # Drawn here, as a device tensor, so the ops stay pure functions of their inputs (which torch.compile
    # and opcheck rely on) and drawing needs no host sync.
    return torch.randint(0, 2**31 - 1, (count,), device=x.device) if stochastic_rounding else None


def quantize_int8(x: Tensor, axis: int, stochastic_rounding: bool = False, row_multipliers: Tensor | None = None,
                  col_amax: Tensor | None = None, k_blocks: bool = False) -> tuple[Tensor, Tensor]:
    """Quantizes ``x`` to int8 with one abs-max scale per slice along the axis that is not reduced.

    Args:
        x: float32, bfloat16 or float16 [R, C], any strides.
        axis: the axis reduced to find each abs-max: 1 gives one scale per row, 0 one per column.
        stochastic_rounding: round up with probability equal to the fractional part (unbiased)
            instead of to the nearest integer. The random numbers come from torch's generator on
            ``x.device``, so ``torch.manual_seed`` reproduces them.
        row_multipliers: ([R, 1] or [R], floating; ``axis=0`` only) quantize ``x`` with each row multiplied by
            its number, in float32 (see ``quantize_int8_rows_and_cols``), instead of ``x``.
        col_amax: (float32 [1, C] or [C]; ``axis=0`` only) the abs-max of each column of what is quantized, as
            ``quantize_int8_rows_keeping_col_amax`` returns it from an earlier pass over the same ``x``: the
            column-wise pass then reads ``x`` once instead of twice.
        k_blocks: (``axis=0`` only) one scale per column per block of K_BLOCK (128) rows instead of per column, each
            block's own abs-max: the scale is [ceil(R / 128), C], and ``q.T`` with ``scale.T`` is a left operand of
            ``scaled_int8_mm`` with a scale per row per block of K (K = R, e.g. grad_weight's tokens). One read of
            ``x``.

    Returns:
        ``(q, scale)``: ``q`` int8 [R, C] with the reduced axis contiguous (strides (C, 1) for
        ``axis=1``, (1, R) for ``axis=0``) and ``scale`` (of ``scale_dtype(x.dtype)``) with the reduced
        axis kept as size 1 ([R, 1] or [1, C]), such that ``q * scale`` approximates ``x``.
    """
    _check_input(x, "quantize_int8")
    if axis not in (0, 1):
        raise ValueError(f"quantize_int8: axis must be 0 (one scale per column) or 1 (one scale per row), got {axis}")
    if axis != 0 and (row_multipliers is not None or col_amax is not None or k_blocks):
        raise ValueError("quantize_int8: row_multipliers, col_amax and k_blocks go with axis=0 (scales per column)")
    if k_blocks and col_amax is not None:
        raise ValueError("quantize_int8: k_blocks takes each block's abs-max itself; pass no col_amax")
    if row_multipliers is not None:
        row_multipliers = _checked_row_multipliers(x, row_multipliers, "quantize_int8: row_multipliers")
    if col_amax is not None:
        col_amax = _checked_col_amax(x, col_amax)
    seed = _draw_seeds(x, 1, stochastic_rounding)
    if _in_torch_ops_when_compiled(x, plain_rows=axis == 1 and not stochastic_rounding):
        return _torch_quantize_int8(x, axis, seed, row_multipliers, col_amax, k_blocks)
    # The op is what torch.compile traces; eager calls skip its dispatch (tens of µs a call).
    if traced(x):
        return torch.ops.qt.quantize_int8(x, axis, seed, row_multipliers, col_amax, k_blocks)
    with eager_launch():
        return _quantize_int8(x, axis, seed, row_multipliers, col_amax, k_blocks)


def quantize_int8_rows_keeping_col_amax(x: Tensor, stochastic_rounding: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``quantize_int8(x, 1, stochastic_rounding)`` and the abs-max of each column of ``x`` (float32 [1, C]; NaN
    counts as inf), taken in the same read of ``x`` (up to 8192 columns; wider, in the abs-max pass the row-wise
    quantization makes anyway). A later ``quantize_int8(x, 0, col_amax=...)`` then quantizes ``x`` by columns
    in one pass instead of two: a linear keeps its input's from the forward for grad_weight (and a master weight
    its own for grad_input).

    Returns ``(q, scale, col_amax)``, ``q`` and ``scale`` as ``quantize_int8(x, 1)`` gives them.
    """
    _check_input(x, "quantize_int8_rows_keeping_col_amax")
    seed = _draw_seeds(x, 1, stochastic_rounding)
    if _in_torch_ops_when_compiled(x):
        return _quantize_int8_rows_keeping_col_amax_in_torch(x, seed)
    if traced(x):
        return torch.ops.qt.quantize_int8_rows_keeping_col_amax(x, seed)
    with eager_launch():
        return _quantize_int8_rows_keeping_col_amax(x, seed)


def quantize_int8_rows_and_cols(x: Tensor, stochastic_rounding: bool = False,
                                col_row_multipliers: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``quantize_int8(x, 1) + quantize_int8(x, 0)``, sharing their reads of ``x``: two reads on a GPU up to 8192
    columns (the row-wise pass folds the column-wise abs-maxima), three wider (one abs-max pass for both), where
    the two calls take three or four.

    ``col_row_multipliers`` ([R, 1] or [R], floating): the column-wise result quantizes ``x`` with each row
    multiplied by its number (taken in float32, where the product of two bfloat16 or float16 numbers is exact)
    instead of ``x``; the row-wise one is unchanged. A linear's backward folds the per-token scales of its
    quantized input into its output gradient this way (qt/linear.py), with no pass of its own.

    Returns ``(q_rows, row_scale, q_cols, col_scale)``, laid out as ``quantize_int8`` lays out each.
    With stochastic rounding the two results round independently.
    """
    _check_input(x, "quantize_int8_rows_and_cols")
    if col_row_multipliers is not None:
        col_row_multipliers = _checked_row_multipliers(x, col_row_multipliers,
                                                       "quantize_int8_rows_and_cols: col_row_multipliers")
    seeds = _draw_seeds(x, 2, stochastic_rounding)
    if _in_torch_ops_when_compiled(x):
        return _quantize_int8_rows_and_cols_in_torch(x, seeds, col_row_multipliers)
    if traced(x):
        return torch.ops.qt.quantize_int8_rows_and_cols(x, seeds, col_row_multipliers)
    with eager_launch():
        return _quantize_int8_rows_and_cols(x, seeds, col_row_multipliers)


def quantize_fp8_rows_and_cols(x: Tensor, row_dtype: torch.dtype, col_dtype: torch.dtype,
                               row_power_of_two: bool = False, col_power_of_two: bool = False,
                               col_row_multipliers: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``qt.kernels.fp8.quantize_fp8`` by rows and by columns with row-wise scales, sharing their reads of ``x`` as
    ``quantize_int8_rows_and_cols`` does (on a GPU, qt's kernels: the row-wise pass folds the columns' abs-maxima,
    then a column-wise pass; two reads of x up to 8192 columns): the FP8 row-wise cast of a linear's dY both ways.

    ``quantize_fp8(x, 1, row_dtype, "rowwise", row_power_of_two)`` and ``quantize_fp8(x', 0, col_dtype, "rowwise",
    col_power_of_two)``, with x' = x with row i multiplied by ``col_row_multipliers[i]`` in float32 where given, else
    x. Returns ``(q_rows, row_scale, q_cols, col_scale)`` as those give them, the same bits."""
    _check_input(x, "quantize_fp8_rows_and_cols")
    for dtype in (row_dtype, col_dtype):
        if dtype not in FP8_DTYPES:
            raise ValueError(f"quantize_fp8_rows_and_cols: the code dtypes must be torch.float8_e4m3fn or "
                             f"torch.float8_e5m2, got {dtype}")
    if col_row_multipliers is not None:
        col_row_multipliers = _checked_row_multipliers(x, col_row_multipliers,
                                                       "quantize_fp8_rows_and_cols: col_row_multipliers")
    args = (x, row_dtype, col_dtype, row_power_of_two, col_power_of_two, col_row_multipliers)
    if traced(x):
        return torch.ops.qt.quantize_fp8_rows_and_cols(*args)
    with eager_launch():
        return _quantize_fp8_rows_and_cols(*args)


def _quantize_fp8_rows_and_cols(x: Tensor, row_dtype: torch.dtype, col_dtype: torch.dtype, row_power_of_two: bool,
                                col_power_of_two: bool,
                                col_row_multipliers: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not use_triton(x, triton is not None) or x.numel() == 0:
        cols_of = x if col_row_multipliers is None else x.float() * col_row_multipliers.float().reshape(-1, 1)
        return (*quantize_fp8(x, 1, row_dtype, "rowwise", row_power_of_two),
                *quantize_fp8(cols_of, 0, col_dtype, "rowwise", col_power_of_two))
    q_rows, row_scale, col_amax = _triton_quantize_rows(x, None, keep_col_amax=True,
                                                        col_row_multipliers=col_row_multipliers,
                                                        codes=Codes(row_dtype, row_power_of_two))
    q_cols, col_scale = _triton_tile_quantize(x, col_amax, None, 0, rows=False, row_multipliers=col_row_multipliers,
                                              codes=Codes(col_dtype, col_power_of_two))
    return q_rows, row_scale, q_cols, col_scale


def _checked_row_multipliers(x: Tensor, multipliers: Tensor, name: str) -> Tensor:
    """`multipliers` as [R], after checking it holds one floating number per row of x, on x's device."""
    rows = x.shape[0]
    if tuple(multipliers.shape) not in ((rows, 1), (rows,)) or not multipliers.is_floating_point():
        raise ValueError(f"{name} must be floating [{rows}, 1] or [{rows}] (one number per row of x), got "
                         f"{multipliers.dtype} {list(multipliers.shape)}")
    if multipliers.device != x.device:
        raise ValueError(f"{name} is on {multipliers.device}, x on {x.device}")
    return multipliers.reshape(-1)


def _checked_col_amax(x: Tensor, col_amax: Tensor) -> Tensor:
    """`col_amax` as [C], after checking it holds one float32 number per column of x, on x's device."""
    cols = x.shape[1]
    if tuple(col_amax.shape) not in ((1, cols), (cols,)) or col_amax.dtype != torch.float32:
        raise ValueError(f"quantize_int8: col_amax must be float32 [1, {cols}] or [{cols}] (one abs-max per column "
                         f"of x, from quantize_int8_rows_keeping_col_amax), got {col_amax.dtype} "
                         f"{list(col_amax.shape)}")
    if col_amax.device != x.device:
        raise ValueError(f"quantize_int8: col_amax is on {col_amax.device}, x on {x.device}")
    return col_amax.reshape(-1)


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``q * scale`` in ``dtype``: int8 ``q`` [R, C] with one float32 scale per row ([R, 1]), the product taken in
    float32 and rounded once to ``dtype``. One pass on a GPU (the torch ops take three, through a float32 copy);
    traced by torch.compile, torch ops, which Inductor fuses into the op that uses the result."""
    if (not traced(q, scale) and use_triton(q, triton is not None) and q.is_contiguous() and scale.is_contiguous()
            and scale.dtype == torch.float32 and q.numel()):
        with eager_launch():
            return _triton_dequantize_rows(q, scale, dtype)
    return (q.to(torch.float32) * scale).to(dtype)


def _in_torch_ops_when_compiled(x: Tensor, plain_rows: bool = False) -> bool:
    """Whether, under torch.compile, this quantization is written in torch ops, which Inductor generates kernels for
    and fuses into the op that produces ``x`` (an RMSNorm, the SwiGLU product, whose BF16 copy then need not be
    stored) and computes once for the linears that share ``x`` (gate/up), rather than a call of qt's Triton kernels.
    ``QT_COMPILED_QUANTIZE`` says which: ``rows`` (the default) the ``plain_rows`` ones (by rows, rounding to nearest,
    no column maxima kept: a linear's input in the forward), ``inductor`` every one, ``kernel`` none. Measured in
    docs/benchmarks.md, round 16; with ``quantize_inductor_options()``."""
    return _compiled_quantize_choice() in (("rows", "inductor") if plain_rows else ("inductor",)) and traced(x)


def _compiled_quantize_choice() -> str:
    choice = os.environ.get("QT_COMPILED_QUANTIZE", "rows")
    if choice not in ("kernel", "rows", "inductor"):
        raise ValueError(f"QT_COMPILED_QUANTIZE={choice!r}: use one of rows, kernel, inductor")
    return choice


# Read by each multi-kernel when a compiled module loads: "1" skips its file of picked sub-kernels.
MULTI_KERNEL_CACHE_VARIABLE = "TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE"
MULTI_KERNEL_VARIABLE = "TORCHINDUCTOR_MULTI_KERNEL"


def quantize_inductor_options() -> dict:
    """The Inductor options compiled quantizations want (``qt.inductor_options(model)`` gives them for a model that
    holds a recipe's weights): where they are written in torch ops (``QT_COMPILED_QUANTIZE``), multi-kernel
    reductions. Fusing a row-wise quantization into
    the op that produces its input makes a reduction over rows wider than Inductor keeps in registers by default
    (1,024 elements): it then loops over each row twice, computing the producer twice (the SwiGLU product's
    quantization took 308 us a TinyLlama layer on an H200, 218 with these options, which compile both forms and
    keep the faster).

    Multi-kernel's cache of which form won is turned off (``TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE=1`` in this
    process, unless set): in torch 2.11 a module loaded from a warm FX-graph cache reads that cache before its Triton
    kernels are usable, and the compile fails ("TypeError: 'NoneType' object does not support the context manager
    protocol", from triton's ``JITFunction.cache_key``). It failed each run seen to find its graphs compiled by an
    earlier run; on 2 GPUs the failing rank left the other waiting in a collective (docs/scaling.md, rounds 20-21).
    Without the cache, each process times the two forms at their first call, as a cold compile does.

    ``TORCHINDUCTOR_MULTI_KERNEL``, where set, stands instead of qt's choice: 0 compiles Inductor's one form of each
    reduction, 2 forces the looping form and 3 the persistent one, without timing them. On 2 GPUs the ranks of one
    run picked differently (their timings of the two forms differed by a few percent), but neither setting made
    bitnet's speed vary less from run to run (docs/scaling.md, round 25)."""
    if _compiled_quantize_choice() == "kernel":
        return {}
    os.environ.setdefault(MULTI_KERNEL_CACHE_VARIABLE, "1")
    if MULTI_KERNEL_VARIABLE in os.environ:  # Inductor's config reads it
        return {}
    return {"triton.multi_kernel": 1}


class Codes(NamedTuple):
    """What a pass writes: INT8 codes with scales in ``scale_dtype(x.dtype)``, or FP8 codes of ``dtype`` with float32
    scales, rounded up to a power of two where ``power_of_two``, as ``qt.kernels.fp8.quantize_fp8`` casts them."""

    dtype: torch.dtype = torch.int8
    power_of_two: bool = False

    @property
    def largest(self) -> float:
        return QUANT_MAX if self.dtype == torch.int8 else torch.finfo(self.dtype).max

    def scale_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return scale_dtype(x_dtype) if self.dtype == torch.int8 else torch.float32

    def min_amax(self, x_dtype: torch.dtype) -> float:
        return _min_amax(x_dtype) if self.dtype == torch.int8 else FP8_MIN_AMAX


INT8_CODES = Codes()


def _empty_outputs(x: Tensor, axis: int, codes: Codes = INT8_CODES, k_blocks: bool = False) -> tuple[Tensor, Tensor]:
    """Allocates ``(q, scale)`` in the documented layout; shared by the kernels, their fake implementations and the
    torch path's column-wise results, so their strides agree (the torch path's row-wise results are new contiguous
    tensors of the same strides)."""
    rows, cols = x.shape
    dtype = codes.scale_dtype(x.dtype)
    if axis == 1:
        q = torch.empty((rows, cols), dtype=codes.dtype, device=x.device)
        scale = torch.empty((rows, 1), dtype=dtype, device=x.device)
    else:
        # aten.empty, transposed, rather than aten.empty_strided: torch.compile merges identical empty_strided calls
        # (of the linears' column-wise passes of one shape) into one allocation, and Inductor then copies that
        # uninitialized buffer for each kernel writing into it (seen on an H100: ~60 us a [16384, 5632] pass).
        q = torch.empty((cols, rows), dtype=codes.dtype, device=x.device).t()
        scale = torch.empty(((rows + K_BLOCK - 1) // K_BLOCK if k_blocks else 1, cols), dtype=dtype, device=x.device)
    return q, scale


def _min_amax(dtype: torch.dtype) -> float:
    # The floor keeps the scale of an all-zero slice positive, so 0 / scale is 0 and not NaN.
    smallest_subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return max(1e-12, QUANT_MAX * smallest_subnormal)


def _quantize_int8(x: Tensor, axis: int, seed: Tensor | None, row_multipliers: Tensor | None = None,
                   col_amax: Tensor | None = None, k_blocks: bool = False) -> tuple[Tensor, Tensor]:
    if not use_triton(x, triton is not None) or x.numel() == 0:
        return _torch_quantize_int8(x, axis, seed, row_multipliers, col_amax, k_blocks)
    if k_blocks:
        return _triton_quantize_col_blocks(x, seed, row_multipliers)
    if axis == 1:
        q, scale, _ = _triton_quantize_rows(x, seed)
        return q, scale
    if col_amax is None:
        _, col_amax = _triton_tile_amax(x, rows=False, cols=True, col_row_multipliers=row_multipliers)
    return _triton_tile_quantize(x, col_amax, seed, 0, rows=False, row_multipliers=row_multipliers)


def _quantize_int8_rows_keeping_col_amax(x: Tensor, seed: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if not use_triton(x, triton is not None) or x.numel() == 0:
        return _quantize_int8_rows_keeping_col_amax_in_torch(x, seed)
    q, scale, col_amax = _triton_quantize_rows(x, seed, keep_col_amax=True)
    return q, scale, col_amax.view(1, -1)


def _quantize_int8_rows_and_cols(x: Tensor, seeds: Tensor | None,
                                 col_row_multipliers: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not use_triton(x, triton is not None) or x.numel() == 0:
        return _quantize_int8_rows_and_cols_in_torch(x, seeds, col_row_multipliers)
    # The rows take seeds[0], the columns seeds[1].
    q_rows, row_scale, col_amax = _triton_quantize_rows(x, seeds, keep_col_amax=True,
                                                        col_row_multipliers=col_row_multipliers)
    q_cols, col_scale = _triton_tile_quantize(x, col_amax, seeds, 1, rows=False, row_multipliers=col_row_multipliers)
    return q_rows, row_scale, q_cols, col_scale


if triton is not None:
    torch.library.triton_op("qt::quantize_int8", _quantize_int8, mutates_args=())
    torch.library.triton_op("qt::quantize_int8_rows_keeping_col_amax", _quantize_int8_rows_keeping_col_amax,
                            mutates_args=())
    torch.library.triton_op("qt::quantize_int8_rows_and_cols", _quantize_int8_rows_and_cols, mutates_args=())
    torch.library.triton_op("qt::quantize_fp8_rows_and_cols", _quantize_fp8_rows_and_cols, mutates_args=())
    realize_inputs_read_by_several_kernels()
else:
    torch.library.custom_op("qt::quantize_int8", _quantize_int8, mutates_args=())
    torch.library.custom_op("qt::quantize_int8_rows_keeping_col_amax", _quantize_int8_rows_keeping_col_amax,
                            mutates_args=())
    torch.library.custom_op("qt::quantize_int8_rows_and_cols", _quantize_int8_rows_and_cols, mutates_args=())
    torch.library.custom_op("qt::quantize_fp8_rows_and_cols", _quantize_fp8_rows_and_cols, mutates_args=())
    torch.library.register_fake("qt::quantize_int8")(
        lambda x, axis, seed, row_multipliers=None, col_amax=None, k_blocks=False: _empty_outputs(
            x, axis, k_blocks=k_blocks))
    torch.library.register_fake("qt::quantize_int8_rows_keeping_col_amax")(
        lambda x, seed: (*_empty_outputs(x, 1), x.new_empty((1, x.shape[1]), dtype=torch.float32)))
    torch.library.register_fake("qt::quantize_int8_rows_and_cols")(
        lambda x, seeds, col_row_multipliers=None: (*_empty_outputs(x, 1), *_empty_outputs(x, 0)))
    torch.library.register_fake("qt::quantize_fp8_rows_and_cols")(
        lambda x, row_dtype, col_dtype, row_power_of_two, col_power_of_two, col_row_multipliers: (
            *_empty_outputs(x, 1, Codes(row_dtype)), *_empty_outputs(x, 0, Codes(col_dtype))))


# The torch path: the same math in torch ops (CPU, QT_KERNEL_BACKEND=torch, and what torch.compile fuses there).


def _quantize_int8_rows_and_cols_in_torch(
    x: Tensor, seeds: Tensor | None, col_row_multipliers: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    row_seed, col_seed = (None, None) if seeds is None else (seeds[0:1], seeds[1:2])
    return (*_torch_quantize_int8(x, 1, row_seed), *_torch_quantize_int8(x, 0, col_seed, col_row_multipliers))


def _quantize_int8_rows_keeping_col_amax_in_torch(x: Tensor, seed: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return (*_torch_quantize_int8(x, 1, seed), abs_max(x, 0))


def _as_rows(t: Tensor, axis: int) -> Tensor:
    """The view whose rows are the slices that ``axis`` reduces."""
    return t if axis == 1 else t.t()


def _uniform_from_hash(seed: Tensor, n_rows: int, n_cols: int, device) -> Tensor:
    """[n_rows, n_cols] uniforms in [0, 1), a hash (murmur3's finalizer) of the seed and each element's
    index. Plain integer ops: deterministic, and traceable by torch.compile (a torch.Generator is not). The Triton
    kernels compute the same numbers (``_hashed_uniform``)."""
    mask = 0xFFFFFFFF
    h = torch.arange(n_rows * n_cols, dtype=torch.int64, device=device).view(n_rows, n_cols)
    h = (h * 0x9E3779B1 + seed.to(torch.int64)) & mask
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ (h >> shift)) * multiplier) & mask
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * 2.0**-24


def _torch_quantize_int8(x: Tensor, axis: int, seed: Tensor | None, row_multipliers: Tensor | None = None,
                         col_amax: Tensor | None = None, k_blocks: bool = False) -> tuple[Tensor, Tensor]:
    """`row_multipliers` [R]: quantize x with each row multiplied by its number (in float32) instead of x.
    `col_amax` [C] (axis 0): the abs-max of each column of that, already taken. `k_blocks` (axis 0): a scale per
    column per K_BLOCK rows."""
    x_float = x.float() if row_multipliers is None else x.float() * row_multipliers.float().reshape(-1, 1)
    x_rows = _as_rows(x_float, axis)
    if k_blocks:  # [C, R] -> [C, blocks, K_BLOCK], the last block padded with zeros
        blocks = torch.nn.functional.pad(x_rows, (0, -x_rows.shape[1] % K_BLOCK)).unflatten(1, (-1, K_BLOCK))
        amax = abs_max(blocks.flatten(0, 1), 1).view(x_rows.shape[0], -1)
    else:
        amax = abs_max(x_rows, 1) if col_amax is None else col_amax.reshape(-1, 1)
    # An empty slice (no tokens) has no maximum: the floor stands in for it.
    amax = amax.clamp(min=_min_amax(x.dtype))
    # Divided by a tensor: CUDA torch multiplies by the reciprocal of a Python number, 1 ulp off the kernels' division.
    dtype = scale_dtype(x.dtype)
    scale_rows = _round_to_scale_dtype(amax / amax.new_full((1, 1), QUANT_MAX), dtype)
    # Each element's scale: its row's, or with k_blocks its block's.
    element_scale = scale_rows.repeat_interleave(K_BLOCK, 1)[:, :x_rows.shape[1]] if k_blocks else scale_rows
    scaled = x_rows * torch.reciprocal(element_scale)  # as the kernels compute it
    if seed is None:
        rounded = torch.round(scaled)
    else:
        rounded = torch.floor(scaled + _uniform_from_hash(seed, *scaled.shape, x.device))
    # Finite values of a slice holding inf or NaN quantize to 0; its infinite scale carries the news.
    codes = torch.where(torch.isfinite(scaled), rounded, 0.0).clamp(-QUANT_MAX, QUANT_MAX).to(torch.int8)
    if axis == 1:
        # New tensors rather than copies into allocated ones, so that torch.compile computes one quantization for the
        # linears that share x (gate/up) instead of a store of the same codes for each.
        return codes.contiguous(), scale_rows.to(dtype)
    q, scale = _empty_outputs(x, axis, k_blocks=k_blocks)
    _as_rows(q, axis).copy_(codes)
    _as_rows(scale, axis).copy_(scale_rows)
    return q, scale


def _round_to_scale_dtype(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """fp32 `scale` rounded to `dtype` (to nearest, ties to even), kept in fp32. For bfloat16 by bit
    arithmetic, as in the Triton kernel: torch.compile drops a `.to(bfloat16).float()` round trip inside a
    fused kernel, and the values divided by must be the scales stored."""
    if dtype != torch.bfloat16:
        return scale.to(dtype).float()
    bits = scale.view(torch.int32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & ~0xFFFF
    return bits.view(torch.float32)


# The Triton path.


def whole_row_blocks(n_cols: int) -> tuple[int, int]:
    """(rows, columns) of the block the whole-row pass holds in registers for rows ``n_cols`` wide: the row padded
    to a power of two, and as many rows as fit 2048 values (at most 16)."""
    block_cols = max(triton.next_power_of_2(n_cols), 16)
    return max(1, min(16, 2048 // block_cols)), block_cols


def col_amax_pass_settings(n_rows: int, n_cols: int, stochastic: bool) -> tuple[int, int, int, int]:
    """(rows a block, blocks a program, warps, pipeline stages) of the whole-row pass that also folds each column's
    abs-max. Each program sends one atomic a column, so it takes many rows (1 row a program took 10x longer). From
    `bench_kernels.py --whole_row_configs` and `--baseline` on an H100 (docs/kernels.md, rounds 12 and 17):
    - rounding to nearest: 16-64 rows a program, 128-256 programs where that allows (2048 and 16384 rows timed
      best there; a 5632-row weight given 88 programs, fewer than the SMs, took 45.7 us in a profiled step where
      2048-row weights took 20-43). Where rows are at most 2048 wide, blocks of 4-8 rows (4 warps) keep more of x
      in flight while a block waits for its row maxima (16384 x 2048: 57.6 us against 68.2 with the stochastic
      setting). Wider rows: blocks of two rows, 4 warps, and the next blocks' loads issued ahead in a 3-stage
      software pipeline (16384 x 5632, columns multiplied as a linear's dY: 162 us against 202 with one row,
      8 warps and no pipeline; at 2048 columns the pipeline gained nothing).
    - stochastic rounding: 32 rows a program, the whole-row block, 8 warps (blocks of 8 rows with its random bits
      took 5x longer).
    Fixed rather than autotuned: the autotuner times launches that take as long as these kernels."""
    block_rows, block_cols = whole_row_blocks(n_cols)
    if stochastic:
        return block_rows, max(1, 32 // block_rows), 8, 1
    rows_per_program = min(64, max(16, 1 << (triton.cdiv(n_rows, 128).bit_length() - 1)))
    if block_cols > 2048:
        return 2, rows_per_program // 2, 4, 3
    block_rows = max(1, min(8, rows_per_program // 4, 16384 // block_cols))
    return block_rows, max(1, rows_per_program // block_rows), 4, 1


def _triton_quantize_whole_rows(x: Tensor, seed: Tensor | None, col_amax: Tensor | None = None,
                                col_row_multipliers: Tensor | None = None,
                                codes: Codes = INT8_CODES) -> tuple[Tensor, Tensor]:
    """Row-wise, one read of x; also folds each column's abs-max (of x with row i multiplied by
    ``col_row_multipliers[i]`` where given) into ``col_amax`` (float32 [C], zeros or earlier maxima) where given."""
    q, scale = _empty_outputs(x, 1, codes)
    n_rows, n_cols = x.shape
    block_rows, block_cols = whole_row_blocks(n_cols)
    keep_col_amax = col_amax is not None
    if keep_col_amax:
        block_rows, blocks_per_program, warps, stages = col_amax_pass_settings(n_rows, n_cols, seed is not None)
    else:
        # One block of rows a program and 4 warps: ~2.8 TB/s on an H200 at 16384 x 2048 and x 5632 (bf16).
        blocks_per_program, warps, stages = 1, 4, 1
    wrap_triton(_quantize_whole_rows_kernel)[(triton.cdiv(n_rows, block_rows * blocks_per_program),)](
        x, q, scale, seed, col_amax, col_row_multipliers,
        n_rows, n_cols, x.stride(0), x.stride(1),
        MIN_AMAX=codes.min_amax(x.dtype), STOCHASTIC=seed is not None, SCALE_IS_BF16=scale.dtype == torch.bfloat16,
        COL_AMAX=keep_col_amax, COLS_MULTIPLIED=col_row_multipliers is not None,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, BLOCKS_PER_PROGRAM=blocks_per_program, NUM_STAGES=stages,
        QMAX=codes.largest, POWER_OF_TWO=codes.power_of_two, num_warps=warps,
    )  # fmt: skip
    return q, scale


def _triton_dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n_rows, n_cols = q.shape
    block_r, block_c = (16, 256)  # also few programs for the interpreter, which runs them one by one
    _dequantize_rows_kernel[(triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))](
        q, scale, out, n_rows, n_cols, OUT_IS_BF16=dtype == torch.bfloat16, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _triton_quantize_rows(x: Tensor, seeds: Tensor | None, keep_col_amax: bool = False,
                          col_row_multipliers: Tensor | None = None,
                          codes: Codes = INT8_CODES) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(q, scale, col_amax)``: x quantized by rows (with ``seeds[0]``) and, where ``keep_col_amax``, the float32
    abs-max of each column [C] of x with row i multiplied by ``col_row_multipliers[i]`` where given (else None).
    Up to ``_MAX_WHOLE_ROW`` columns in one read of x; wider, an abs-max pass (taking the columns' too) and a
    quantize pass."""
    n_cols = x.shape[1]
    if n_cols <= _MAX_WHOLE_ROW:
        col_amax = torch.zeros(n_cols, dtype=torch.float32, device=x.device) if keep_col_amax else None
        return *_triton_quantize_whole_rows(x, seeds, col_amax, col_row_multipliers, codes), col_amax
    row_amax, col_amax = _triton_tile_amax(x, rows=True, cols=keep_col_amax, col_row_multipliers=col_row_multipliers)
    return *_triton_tile_quantize(x, row_amax, seeds, 0, rows=True, codes=codes), col_amax


def _tile_grid(x: Tensor):
    def grid(meta):
        return (triton.cdiv(x.shape[0], meta["BLOCK_R"]), triton.cdiv(x.shape[1], meta["BLOCK_C"]))

    return grid


def _triton_tile_amax(x: Tensor, rows: bool, cols: bool,
                      col_row_multipliers: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """The float32 abs-max of each row [R] and of each column [C] of x (the latter of x with row i multiplied by
    ``col_row_multipliers[i]`` where given), whichever are asked for (else None), in one pass over tiles."""
    n_rows, n_cols = x.shape
    # atomic_max needs a starting value: 0 is below every abs-max. (Re-running the pass, as autotuning
    # does, leaves the maxima as they are.)
    row_amax = torch.zeros(n_rows, dtype=torch.float32, device=x.device) if rows else None
    col_amax = torch.zeros(n_cols, dtype=torch.float32, device=x.device) if cols else None
    wrap_triton(_tile_amax_kernel)[_tile_grid(x)](
        x, row_amax, col_amax, col_row_multipliers, n_rows, n_cols, x.stride(0), x.stride(1),
        ROWS=rows, COLS=cols, COLS_MULTIPLIED=col_row_multipliers is not None,
    )  # fmt: skip
    return row_amax, col_amax


def _triton_quantize_col_blocks(x: Tensor, seed: Tensor | None,
                                row_multipliers: Tensor | None) -> tuple[Tensor, Tensor]:
    """x quantized by columns with a scale per column per K_BLOCK rows, in tiles of K_BLOCK rows: each tile takes
    its columns' abs-maxima itself, so x is read once."""
    q, scale = _empty_outputs(x, 0, k_blocks=True)
    block_c, warps = (32, 4) if os.environ.get("TRITON_INTERPRET") == "1" else (64, 8)
    grid = (triton.cdiv(x.shape[0], K_BLOCK), triton.cdiv(x.shape[1], block_c))
    # The tile pass at a fixed tile (its autotuner's configs have other heights). Every argument is passed, defaults
    # too: torch.compile reads which tensors a kernel writes from its IR, and where it cannot build that (an argument
    # missing) it takes every input as written, and copies x for the kernel.
    wrap_triton(_tile_quantize_kernel.fn)[grid](
        x, None, q, scale, seed, row_multipliers, x.shape[0], x.shape[1], x.stride(0), x.stride(1),
        MIN_AMAX=_min_amax(x.dtype), ROWS=False, MULTIPLIED=row_multipliers is not None, STOCHASTIC=seed is not None,
        SEED_INDEX=0, SCALE_IS_BF16=scale.dtype == torch.bfloat16, BLOCK_R=K_BLOCK, BLOCK_C=block_c,
        QMAX=INT8_CODES.largest, POWER_OF_TWO=False, TILE_AMAX=True, num_warps=warps,
    )  # fmt: skip
    return q, scale


def _triton_tile_quantize(x: Tensor, amax: Tensor, seeds: Tensor | None, seed_index: int, rows: bool,
                          row_multipliers: Tensor | None = None, codes: Codes = INT8_CODES) -> tuple[Tensor, Tensor]:
    """x quantized by rows (``rows``) or by columns, with the abs-maxima ``amax`` of its rows or columns, of x with
    row i multiplied by ``row_multipliers[i]`` where given (columns only); stochastically with
    ``seeds[seed_index]`` where seeds are given."""
    q, scale = _empty_outputs(x, 1 if rows else 0, codes)
    # Each output from its own pass: one pass writing both held two tiles' worth of state (and the
    # transpose's shared memory) and ran at a quarter of the occupancy (measured with ncu on an H100).
    wrap_triton(_tile_quantize_kernel)[_tile_grid(x)](
        x, amax, q, scale, seeds, row_multipliers, x.shape[0], x.shape[1], x.stride(0), x.stride(1),
        MIN_AMAX=codes.min_amax(x.dtype), ROWS=rows, MULTIPLIED=row_multipliers is not None,
        STOCHASTIC=seeds is not None, SEED_INDEX=seed_index, SCALE_IS_BF16=scale.dtype == torch.bfloat16,
        QMAX=codes.largest, POWER_OF_TWO=codes.power_of_two, TILE_AMAX=False,
    )  # fmt: skip
    return q, scale


if triton is not None:

    @triton.jit
    def _round_half_to_even(v):
        # Adding 1.5 * 2**23 leaves no fraction bits: the float32 addition rounds v to the nearest integer, ties to
        # even, for |v| < 2**22 (larger values only clamp to 127 later). Two instructions, where floor-and-compare
        # took ten and the kernels ran short of issue slots (libdevice's rint: the interpreter cannot run it).
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _drop_mantissa_bits(v, DROPPED: tl.constexpr):
        """fp32 `v` rounded to the nearest value with DROPPED fewer mantissa bits (ties to even; the sign bit plays
        no part; a rounding carries into the exponent), kept in fp32. Infinity stays infinity (its low bits are
        zero)."""
        bits = v.to(tl.uint32, bitcast=True)
        lowest_kept_bit = (bits >> DROPPED) & 1
        HALF_BELOW: tl.constexpr = (1 << (DROPPED - 1)) - 1
        KEPT: tl.constexpr = (0xFFFFFFFF >> DROPPED) << DROPPED
        return ((bits + HALF_BELOW + lowest_kept_bit) & KEPT).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_to_bfloat16(v):
        """Rounds fp32 values to the nearest bfloat16, kept in fp32. A plain ``.to(tl.bfloat16)`` rounds this way on
        the GPU, but Triton's interpreter truncates, which would make the CPU tests disagree with torch; after this
        the cast is exact on both."""
        return _drop_mantissa_bits(v, 16)

    @triton.jit
    def _round_to_fp8(v, CODE_DTYPE: tl.constexpr):
        """float32 `v` (within the format's range) rounded to the nearest value of FP8 CODE_DTYPE, ties to even, kept
        in float32: normal values by dropping mantissa bits, subnormal ones as multiples of the smallest step."""
        MANTISSA_BITS: tl.constexpr = 3 if CODE_DTYPE == tl.float8e4nv else 2
        MIN_NORMAL: tl.constexpr = 2.0**-6 if CODE_DTYPE == tl.float8e4nv else 2.0**-14
        normal = _drop_mantissa_bits(v, 23 - MANTISSA_BITS)
        step = MIN_NORMAL * 2.0**-MANTISSA_BITS
        subnormal = _round_half_to_even(tl.abs(v) * (1.0 / step)) * step  # then v's sign: -0.0 where v rounds to 0
        sign = v.to(tl.uint32, bitcast=True) & 0x80000000
        subnormal = (subnormal.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        return tl.where(tl.abs(v) < MIN_NORMAL, subnormal, normal)

    # Triton's interpreter runs a reduction with a combine function of its own one element at a time in Python (the
    # CPU tests took 10x longer); it takes tl.max, with NaN made inf before it. The same results either way.
    _INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

    @triton.jit
    def _max_keeping_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _nan_as_inf(amax):
        return tl.where(amax != amax, float("inf"), amax)

    @triton.jit
    def _abs_max_nan_or_inf(x, axis):
        """The largest |x| along `axis`, NaN (on a GPU) or inf (interpreted) where a value is NaN: `_nan_as_inf`
        makes it inf, which keeps it visible as an infinite scale. On a GPU, NaN-propagating max instructions with
        |x| as their operand: the kernels are short of issue slots, and a test and a select per element (Triton's
        max skips NaN) cost more than the maximum itself."""
        if _INTERPRETED:
            return tl.max(_nan_as_inf(tl.abs(x)), axis)
        return tl.reduce(tl.abs(x), axis, _max_keeping_nan)

    @triton.jit
    def _abs_max(x, axis):
        """The largest |x| along `axis`, NaN counted as inf."""
        return _nan_as_inf(_abs_max_nan_or_inf(x, axis))

    @triton.jit
    def _scale_from_amax(amax, MIN_AMAX: tl.constexpr, SCALE_IS_BF16: tl.constexpr, QMAX: tl.constexpr,
                         POWER_OF_TWO: tl.constexpr):
        """The scale as stored (rounded to the scale dtype, or up to a power of two), in fp32, so q * scale is what
        the kernel meant. QMAX: the largest code (127, or an FP8 format's largest finite value)."""
        scale = tl.div_rn(tl.maximum(amax, MIN_AMAX), QMAX)
        if SCALE_IS_BF16:
            scale = _round_to_bfloat16(scale)
        if POWER_OF_TWO:  # as qt.kernels.fp8 rounds it: a nonzero mantissa carries into the exponent; inf stays inf
            scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & ~0x7FFFFF).to(tl.float32, bitcast=True)
        return scale

    @triton.jit
    def _hashed_uniform(seed, index):
        """``_uniform_from_hash``'s number for the element at ``index`` (int64): uint32 arithmetic wraps where the
        torch version masks, so the kernels and the torch ops round stochastically alike. A few integer ops an
        element, where ``tl.rand``'s Philox takes ten rounds of them."""
        h = index.to(tl.uint32) * 0x9E3779B1 + seed.to(tl.uint32)
        h = (h ^ (h >> 16)) * 0x85EBCA6B
        h = (h ^ (h >> 13)) * 0xC2B2AE35
        h = h ^ (h >> 16)
        return (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2 ** -24

    @triton.jit
    def _quantize_values(x, scale, seed, random_offsets, STOCHASTIC: tl.constexpr, CODE_DTYPE: tl.constexpr,
                         QMAX: tl.constexpr):
        """Codes of x * (1 / scale): int8, finite values of a slice with an infinite scale becoming 0; or FP8 of
        CODE_DTYPE, clamped to +-QMAX and rounded to nearest even, NaN kept (as qt.kernels.fp8 casts)."""
        # One division a slice, a multiplication an element: a division an element made the passes compute-bound.
        if CODE_DTYPE == tl.int8:
            # An fma with +0 rather than a product: the GPU compiler fuses a product with the addition that rounds
            # it (or the stochastic one) into an fma, which rounds the exact product, and the result then differed
            # from torch's in some elements (seen on an H200). Nothing fuses into an fma.
            scaled = tl.fma(x, tl.div_rn(1.0, scale), 0.0)
            if STOCHASTIC:
                # Rounds up with probability frac(scaled); the element's index keys its random number.
                rounded = tl.floor(scaled + _hashed_uniform(seed, random_offsets))
            else:
                rounded = _round_half_to_even(scaled)
            rounded = tl.where(scaled == scaled, rounded, 0.0)
            codes = tl.minimum(tl.maximum(rounded, -127.0), 127.0).to(tl.int8)
        else:
            # A plain product: no addition follows it to fuse with, and x * 0 keeps the sign of a zero (an fma's
            # + 0 would not) as torch's -0.0 codes do.
            scaled = x * tl.div_rn(1.0, scale)
            clamped = tl.clamp(scaled, -QMAX, QMAX, propagate_nan=tl.PropagateNan.ALL)
            if _INTERPRETED:
                # Its float32 -> FP8 cast drops the carry of a rounding into the exponent (126.9 -> 64) and turns NaN
                # into 384: the value is rounded here first, and NaN's code set from its bits.
                nan_code = tl.full(clamped.shape, 0x7F, tl.uint8).to(CODE_DTYPE, bitcast=True)
                codes = tl.where(clamped == clamped, _round_to_fp8(clamped, CODE_DTYPE).to(CODE_DTYPE), nan_code)
            else:
                codes = clamped.to(CODE_DTYPE, fp_downcast_rounding="rtne")
        return codes

    @triton.jit
    def _quantize_whole_rows_kernel(
        x_ptr, q_ptr, scale_ptr, seed_ptr, col_amax_ptr, col_row_multipliers_ptr,
        n_rows, n_cols, stride_x_row, stride_x_col,
        MIN_AMAX: tl.constexpr, STOCHASTIC: tl.constexpr, SCALE_IS_BF16: tl.constexpr,
        COL_AMAX: tl.constexpr, COLS_MULTIPLIED: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
        NUM_STAGES: tl.constexpr = 1, QMAX: tl.constexpr = 127.0, POWER_OF_TWO: tl.constexpr = False,
    ):  # fmt: skip
        """Quantizes BLOCKS_PER_PROGRAM blocks of BLOCK_ROWS whole rows of x, one block at a time in registers: one
        read of x. With COL_AMAX it also folds the abs-max of each column (of x with row i multiplied by
        col_row_multipliers[i] where COLS_MULTIPLIED) into col_amax, one atomic per column and program."""
        r = tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_COLS)
        seed = tl.load(seed_ptr) if STOCHASTIC else 0
        col_max = tl.zeros([BLOCK_COLS], dtype=tl.float32)
        for block in tl.range(BLOCKS_PER_PROGRAM, num_stages=NUM_STAGES):
            row_start = (tl.program_id(0) * BLOCKS_PER_PROGRAM + block) * BLOCK_ROWS
            rows = row_start + r
            in_bounds = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
            # 64-bit arithmetic only for the block's start: offsets within a block fit in 32 bits (fewer registers).
            x_block = x_ptr + row_start.to(tl.int64) * stride_x_row
            x = tl.load(x_block + r[:, None] * stride_x_row + cols[None, :] * stride_x_col, mask=in_bounds, other=0.0)
            x = x.to(tl.float32)
            scale = _scale_from_amax(_abs_max(x, 1), MIN_AMAX, SCALE_IS_BF16, QMAX, POWER_OF_TWO)
            tl.store(scale_ptr + rows, scale.to(scale_ptr.dtype.element_ty), mask=rows < n_rows)
            random_offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :] if STOCHASTIC else 0
            q = _quantize_values(x, scale[:, None], seed, random_offsets, STOCHASTIC, q_ptr.dtype.element_ty, QMAX)
            q_block = q_ptr + row_start.to(tl.int64) * n_cols
            tl.store(q_block + r[:, None] * n_cols + cols[None, :], q, mask=in_bounds)
            if COL_AMAX:
                if COLS_MULTIPLIED:
                    multipliers = tl.load(col_row_multipliers_ptr + rows, mask=rows < n_rows, other=0.0)
                    x = x * multipliers.to(tl.float32)[:, None]
                col_max = _max_keeping_nan(col_max, _abs_max_nan_or_inf(x, 0))
        if COL_AMAX:
            tl.atomic_max(col_amax_ptr + cols, _nan_as_inf(col_max), mask=cols < n_cols, sem="relaxed")

    @triton.jit
    def _dequantize_rows_kernel(q_ptr, scale_ptr, out_ptr, n_rows, n_cols,
                                OUT_IS_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_bounds = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        q = tl.load(q_ptr + offsets, mask=in_bounds, other=0)
        scale = tl.load(scale_ptr + rows, mask=rows < n_rows, other=0.0)
        out = q.to(tl.float32) * scale[:, None]
        if OUT_IS_BF16:
            out = _round_to_bfloat16(out)
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=in_bounds)

    @triton.jit
    def _tile_coordinates(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile: its first row and column, row and column indices within the tile and in x,
        and which elements are inside x. (No pointers here: torch.compile reads which tensors a kernel
        writes from its IR, and a pointer handed to a helper function counts as written: a copy of x.)"""
        row_start, col_start = tl.program_id(0) * BLOCK_R, tl.program_id(1) * BLOCK_C
        r, c = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_C)
        rows, cols = row_start + r, col_start + c
        in_bounds = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return row_start, col_start, r, c, rows, cols, in_bounds

    @triton.autotune(configs=_tile_configs(), key=["n_rows", "n_cols", "ROWS", "COLS", "COLS_MULTIPLIED"])
    @triton.jit
    def _tile_amax_kernel(
        x_ptr, row_amax_ptr, col_amax_ptr, col_row_multipliers_ptr,
        n_rows, n_cols, stride_x_row, stride_x_col,
        ROWS: tl.constexpr, COLS: tl.constexpr, COLS_MULTIPLIED: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        row_start, col_start, r, c, rows, cols, in_bounds = _tile_coordinates(n_rows, n_cols, BLOCK_R, BLOCK_C)
        x_tile = x_ptr + row_start.to(tl.int64) * stride_x_row + col_start.to(tl.int64) * stride_x_col
        x = tl.load(x_tile + r[:, None] * stride_x_row + c[None, :] * stride_x_col, mask=in_bounds, other=0.0)
        x = x.to(tl.float32)
        if ROWS:
            tl.atomic_max(row_amax_ptr + rows, _abs_max(x, 1), mask=rows < n_rows, sem="relaxed")
        if COLS:
            if COLS_MULTIPLIED:
                multipliers = tl.load(col_row_multipliers_ptr + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
                x = x * multipliers[:, None]
            tl.atomic_max(col_amax_ptr + cols, _abs_max(x, 0), mask=cols < n_cols, sem="relaxed")

    @triton.autotune(configs=_tile_configs(), key=["n_rows", "n_cols", "ROWS", "MULTIPLIED", "STOCHASTIC"])
    @triton.jit
    def _tile_quantize_kernel(
        x_ptr, amax_ptr, q_ptr, scale_ptr, seed_ptr, row_multipliers_ptr,
        n_rows, n_cols, stride_x_row, stride_x_col,
        MIN_AMAX: tl.constexpr, ROWS: tl.constexpr, MULTIPLIED: tl.constexpr, STOCHASTIC: tl.constexpr,
        SEED_INDEX: tl.constexpr, SCALE_IS_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
        QMAX: tl.constexpr = 127.0, POWER_OF_TWO: tl.constexpr = False, TILE_AMAX: tl.constexpr = False,
    ):  # fmt: skip
        """One output: row-wise (ROWS) or column-wise, with the abs-maxima of _tile_amax_kernel, of x with each
        row multiplied by its number where MULTIPLIED; or, column-wise with TILE_AMAX, with a scale per column of
        each tile from the tile's own abs-maxima (scale [cdiv(n_rows, BLOCK_R), n_cols]). The element's index in
        that output (row-major or column-major) keys its random number, as in the other kernel."""
        row_start, col_start, r, c, rows, cols, in_bounds = _tile_coordinates(n_rows, n_cols, BLOCK_R, BLOCK_C)
        x_tile = x_ptr + row_start.to(tl.int64) * stride_x_row + col_start.to(tl.int64) * stride_x_col
        x = tl.load(x_tile + r[:, None] * stride_x_row + c[None, :] * stride_x_col, mask=in_bounds, other=0.0)
        x = x.to(tl.float32)
        if MULTIPLIED:
            multipliers = tl.load(row_multipliers_ptr + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
            x = x * multipliers[:, None]
        seed = tl.load(seed_ptr + SEED_INDEX) if STOCHASTIC else 0
        if ROWS:
            scale = _scale_from_amax(tl.load(amax_ptr + rows, mask=rows < n_rows, other=0.0), MIN_AMAX, SCALE_IS_BF16,
                                     QMAX, POWER_OF_TWO)
            if tl.program_id(1) == 0:
                tl.store(scale_ptr + rows, scale.to(scale_ptr.dtype.element_ty), mask=rows < n_rows)
            random_offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :] if STOCHASTIC else 0
            q = _quantize_values(x, scale[:, None], seed, random_offsets, STOCHASTIC, q_ptr.dtype.element_ty, QMAX)
            q_tile = q_ptr + row_start.to(tl.int64) * n_cols + col_start
            tl.store(q_tile + r[:, None] * n_cols + c[None, :], q, mask=in_bounds)
        else:  # the transpose happens in this store
            if TILE_AMAX:  # rows past the end were loaded as zeros, below every abs-max
                scale = _scale_from_amax(_abs_max(x, 0), MIN_AMAX, SCALE_IS_BF16, QMAX, POWER_OF_TWO)
                tl.store(scale_ptr + tl.program_id(0) * n_cols + cols, scale.to(scale_ptr.dtype.element_ty),
                         mask=cols < n_cols)
            else:
                scale = _scale_from_amax(tl.load(amax_ptr + cols, mask=cols < n_cols, other=0.0), MIN_AMAX,
                                         SCALE_IS_BF16, QMAX, POWER_OF_TWO)
                if tl.program_id(0) == 0:
                    tl.store(scale_ptr + cols, scale.to(scale_ptr.dtype.element_ty), mask=cols < n_cols)
            random_offsets = cols[None, :].to(tl.int64) * n_rows + rows[:, None] if STOCHASTIC else 0
            q = _quantize_values(x, scale[None, :], seed, random_offsets, STOCHASTIC, q_ptr.dtype.element_ty, QMAX)
            q_tile = q_ptr + col_start.to(tl.int64) * n_rows + row_start
            tl.store(q_tile + c[None, :] * n_rows + r[:, None], q, mask=in_bounds)
