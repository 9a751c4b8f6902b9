"""FP8 (E4M3 / E5M2) quantization and the scaled FP8 matmul, written in plain torch ops.

``quantize_fp8(x, axis, dtype, scaling)`` returns ``(q, scale)`` with ``q * scale`` approximating ``x``, laid out
as ``quantize_int8`` lays out its result (the reduced axis contiguous, the K-contiguous layout matmuls want):

- ``scaling="rowwise"``: one scale per slice along the axis that is not reduced ([R, 1] for ``axis=1``, [1, C]
  for ``axis=0``), as INT8 does;
- ``scaling="tensorwise"``: one scale for the whole tensor ([1, 1]); ``axis`` then only picks the layout.

A scale is ``amax / max(dtype)`` in float32, computed on the device (no host sync); with
``power_of_two_scales`` it is rounded up to a power of two, so dividing by it is exact. A slice of zeros gets the
finite scale of ``_MIN_AMAX`` (its values quantize to 0). A slice holding NaN or inf gets an infinite scale, as
in ``quantize_int8``: its values become 0 or NaN, and whatever is computed from it is non-finite (with
tensor-wise scaling, the whole operand). Nothing non-finite is ever quantized into finite codes.

The casts are torch ops rather than kernels, so that under torch.compile Inductor fuses the abs-max and the
cast into the ops around them (the producer of an activation, the transposes), as torchao's float8 training does.

``scaled_fp8_mm(a, b, a_scale, b_scale, out_dtype)`` is ``(a @ b) * a_scale * b_scale``. It runs
``torch._scaled_mm`` on CUDA GPUs of compute capability 8.9 (Ada) or newer, and elsewhere (CPU, older GPUs) an
emulation with the same numbers up to accumulation order: the FP8 values upcast to float32 (exactly), a float32
matmul, the product of the scales applied once. ``QT_FP8_MATMUL`` overrides the choice, read at every call:
``emulated`` forces the emulation, ``scaled_mm`` the kernel (an error where the hardware has none).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_DTYPES = (E4M3, E5M2)
SCALINGS = ("rowwise", "tensorwise")
# The floor keeps the scale of an all-zero slice positive (0 / scale is 0, not NaN) and far from float32's
# subnormals (1e-12 / 448 ~ 2e-15).
_MIN_AMAX = 1e-12
_MATMUL_CHOICES = ("auto", "scaled_mm", "emulated")
_KERNEL_CAPABILITY = (8, 9)
# torch._scaled_mm wants K and N to be multiples of this: other shapes are zero-padded.
_SCALED_MM_MULTIPLE = 16


def abs_max(x: Tensor, axis: int | None) -> Tensor:
    """The float32 abs-max of each slice of ``x`` [R, C] along ``axis`` (kept as size 1), or of all of ``x`` as
    [1, 1] for ``axis=None``. NaN gives inf; an empty slice gives 0."""
    magnitude = x.float().abs()
    if axis is None:
        result = magnitude.amax().view(1, 1) if x.numel() else magnitude.new_zeros(1, 1)
    else:
        result = magnitude.amax(dim=axis, keepdim=True) if x.shape[axis] else magnitude.sum(dim=axis, keepdim=True)
    # amax propagates NaN: the scale of a slice holding one is infinite, like that of a slice holding inf.
    return torch.where(torch.isnan(result), torch.inf, result)


def scale_from_amax(amax: Tensor, dtype: torch.dtype, power_of_two_scales: bool = False) -> Tensor:
    """The float32 scale that maps ``amax`` to the largest finite value of ``dtype`` (rounded up to a power of
    two with ``power_of_two_scales``)."""
    # Divided by a tensor: CUDA torch multiplies by the reciprocal of a Python number, 1 ulp off the kernels' division.
    scale = amax.clamp(min=_MIN_AMAX) / amax.new_full((), torch.finfo(dtype).max)
    return _round_up_to_power_of_two(scale) if power_of_two_scales else scale


def _round_up_to_power_of_two(scale: Tensor) -> Tensor:
    """The smallest power of two >= each positive normal float32 value (inf stays inf), by bit arithmetic:
    exact where log2/exp2 may round a power of two away from itself."""
    bits = scale.view(torch.int32)
    mantissa = 0x7FFFFF
    rounded = (bits + mantissa) & ~mantissa  # a nonzero mantissa carries into the exponent
    return rounded.view(torch.float32)


def quantize_fp8(x: Tensor, axis: int, dtype: torch.dtype = E4M3, scaling: str = "rowwise",
                 power_of_two_scales: bool = False, amax_of_x: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Quantizes ``x`` to ``dtype`` with abs-max scales.

    Args:
        x: float32, bfloat16 or float16 [R, C], any strides.
        axis: the reduced axis (the one laid out contiguously): 1 for a matmul's left operand [M, K], 0 for
            its right operand [K, N]. With rowwise scaling there is one scale per slice along the other axis.
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        scaling: "rowwise" or "tensorwise".
        power_of_two_scales: round each scale up to a power of two.
        amax_of_x: the abs-max to scale by instead of ``x``'s own, shaped as ``abs_max`` gives it (one element
            tensor-wise; [R, 1] or [1, C] row-wise, by the axis): an FSDP shard quantized with the abs-max of the
            whole weight, or maxima taken earlier.

    Returns:
        ``(q, scale)``: ``q`` of ``dtype`` [R, C] with strides (C, 1) for ``axis=1``, (1, R) for ``axis=0``;
        ``scale`` float32 [R, 1] or [1, C] (rowwise) or [1, 1] (tensorwise), such that ``q * scale``
        approximates ``x``.
    """
    _check_quantize_args(x, axis, dtype, scaling, amax_of_x)
    rows = x if axis == 1 else x.t()  # the slices that the reduction runs along, as rows
    if amax_of_x is None:
        amax_of_rows = abs_max(rows, None if scaling == "tensorwise" else 1)
    else:
        amax_of_rows = amax_of_x if axis == 1 or scaling == "tensorwise" else amax_of_x.t()
    scale = scale_from_amax(amax_of_rows, dtype, power_of_two_scales)
    largest = torch.finfo(dtype).max
    # Multiplied by the reciprocal, one a scale, as the INT8 kernels do: Inductor's kernels would otherwise divide
    # each element (an IEEE division, about ten instructions). End to end on an H200, 0.8-1.0% more tokens a second
    # tensor-wise and 1.3-2.0% row-wise, in two calls of opposite orders (docs/kernels.md, round 11). The same bits
    # with power-of-two scales; otherwise x * (1 / s) and x / s may round apart at exact ties (none in the
    # benchmark's casts on the GPU; 3e-4 to 6e-4 of row-wise codes on the CPU for bf16 randn).
    q = (rows.float() * torch.reciprocal(scale)).clamp(-largest, largest).to(dtype).contiguous()
    return (q, scale) if axis == 1 else (q.t(), scale.t())


def _check_quantize_args(x, axis, dtype, scaling, amax_of_x) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize_fp8: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8: x must be 2-D, got shape {list(x.shape)}; reshape it to [rows, cols] first")
    if axis not in (0, 1):
        raise ValueError(f"quantize_fp8: axis must be 0 or 1 (the reduced axis), got {axis}")
    if dtype not in FP8_DTYPES:
        raise ValueError(f"quantize_fp8: dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    if scaling not in SCALINGS:
        raise ValueError(f"quantize_fp8: scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
    if amax_of_x is not None:
        expected = (1, 1) if scaling == "tensorwise" else (x.shape[0], 1) if axis == 1 else (1, x.shape[1])
        if amax_of_x.dtype != torch.float32 or tuple(amax_of_x.shape) != expected:
            raise ValueError(f"quantize_fp8: amax_of_x must be float32 {list(expected)} ({scaling} scaling, axis "
                             f"{axis}), got {amax_of_x.dtype} {list(amax_of_x.shape)}")


def scaled_fp8_mm(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, out_dtype: torch.dtype,
                  fast_accumulation: bool = False) -> Tensor:
    """Returns ``(a @ b) * a_scale * b_scale`` as an [M, N] tensor of ``out_dtype``.

    Args:
        a: FP8 [M, K], any strides (the kernel wants it row-major; other layouts are copied).
        b: FP8 [K, N], any strides (the kernel wants it column-major, i.e. ``quantize_fp8(..., axis=0)``'s layout).
            At most one of ``a`` and ``b`` may be E5M2.
        a_scale, b_scale: float32, both with one element (tensorwise), or [M, 1] and [1, N] (rowwise).
        out_dtype: float32, bfloat16 or float16. The kernel computes rowwise products in bfloat16 (what
            ``torch._scaled_mm`` gives on every FP8 GPU) and converts to ``out_dtype``.
        fast_accumulation: let the kernel accumulate in Hopper's faster, less precise mode (the emulation
            accumulates in float32 either way).
    """
    _check_mm_args(a, b, a_scale, b_scale)
    if 0 in (*a.shape, b.shape[1]):  # e.g. a micro-batch without tokens; an empty reduction sums to 0
        return torch.zeros((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
    if _uses_scaled_mm(a):
        return _scaled_mm(a, b, a_scale, b_scale, out_dtype, fast_accumulation)
    return _emulated_scaled_mm(a, b, a_scale, b_scale, out_dtype)


def _check_mm_args(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor) -> None:
    if a.dtype not in FP8_DTYPES or b.dtype not in FP8_DTYPES:
        raise TypeError(f"scaled_fp8_mm: a and b must be FP8 (got {a.dtype} and {b.dtype}); quantize them with "
                        "quantize_fp8 first")
    if a.dtype == b.dtype == E5M2:
        raise TypeError("scaled_fp8_mm: at most one operand may be float8_e5m2 (FP8 tensor cores take no E5M2 x E5M2)")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"scaled_fp8_mm: a [M, K] and b [K, N] must be 2-D with the same K, got shapes "
                         f"{list(a.shape)} and {list(b.shape)}")
    (m, _), n = a.shape, b.shape[1]
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise TypeError(f"scaled_fp8_mm: the scales must be float32, got {a_scale.dtype} and {b_scale.dtype}")
    tensorwise = a_scale.numel() == 1 and b_scale.numel() == 1
    if not tensorwise and (tuple(a_scale.shape) != (m, 1) or tuple(b_scale.shape) != (1, n)):
        raise ValueError(f"scaled_fp8_mm: the scales must both hold one element (tensorwise) or be [{m}, 1] and "
                         f"[1, {n}] (rowwise), got {list(a_scale.shape)} and {list(b_scale.shape)}")


def fp8_kernel_unavailable(device: torch.device) -> str | None:
    """Why FP8 matmuls cannot run on ``device`` as QT_FP8_MATMUL asks, or None when they can (the emulation
    runs anywhere)."""
    if _matmul_choice() != "scaled_mm" or _has_fp8_kernel(device):
        return None
    where = "the CPU" if device.type == "cpu" else f"{device}"
    if device.type == "cuda":
        where += " (compute capability {}.{})".format(*_capability(device))
    return (f"QT_FP8_MATMUL=scaled_mm asks for torch._scaled_mm, which needs a CUDA GPU of compute capability "
            f"{'.'.join(map(str, _KERNEL_CAPABILITY))} or newer, not {where}; unset it to emulate FP8 matmuls")


def _matmul_choice() -> str:
    choice = os.environ.get("QT_FP8_MATMUL", "auto")
    if choice not in _MATMUL_CHOICES:
        raise ValueError(f"QT_FP8_MATMUL={choice!r}: use one of {', '.join(_MATMUL_CHOICES)}")
    return choice


def _capability(device: torch.device) -> tuple[int, int]:
    # get_device_properties is a constant to torch.compile (get_device_capability is not traced as one).
    properties = torch.cuda.get_device_properties(device)
    return properties.major, properties.minor


def _has_fp8_kernel(device: torch.device) -> bool:
    return device.type == "cuda" and torch.version.hip is None and _capability(device) >= _KERNEL_CAPABILITY


def _uses_scaled_mm(t: Tensor) -> bool:
    reason = fp8_kernel_unavailable(t.device)
    if reason is not None:
        raise RuntimeError(reason)
    return _matmul_choice() != "emulated" and _has_fp8_kernel(t.device)


def _emulated_scaled_mm(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    # FP8 values are exact in float32, and so are their products: only the sums round, as in the kernel.
    return ((a.float() @ b.float()) * (a_scale * b_scale)).to(out_dtype)


def _scaled_mm(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, out_dtype: torch.dtype,
               fast_accumulation: bool) -> Tensor:
    """``torch._scaled_mm`` with its constraints met: ``a`` row-major and ``b`` column-major, K and N
    zero-padded to multiples of 16 (zeros add nothing to the sums; the padded columns are cut off), and
    bfloat16 output for rowwise scales."""
    k, n = a.shape[1], b.shape[1]
    pad_k, pad_n = -k % _SCALED_MM_MULTIPLE, -n % _SCALED_MM_MULTIPLE
    a = _pad_fp8(a.contiguous(), 0, pad_k)
    b = _pad_fp8(b.t().contiguous(), pad_n, pad_k).t()
    rowwise = not (a_scale.numel() == 1 and b_scale.numel() == 1)
    if rowwise:
        b_scale = F.pad(b_scale, (0, pad_n), value=1.0)
    kernel_dtype = torch.bfloat16 if rowwise else out_dtype
    out = torch._scaled_mm(a, b, a_scale.contiguous(), b_scale.contiguous(), out_dtype=kernel_dtype,
                           use_fast_accum=fast_accumulation)
    return out[:, :n].to(out_dtype)


def _pad_fp8(t: Tensor, rows: int, cols: int) -> Tensor:
    """``t`` (row-major) with zero rows and columns appended: padded as bytes (FP8 +0.0 is the zero byte in
    both formats), which every backend supports."""
    if not (rows or cols):
        return t
    return F.pad(t.view(torch.uint8), (0, cols, 0, rows)).view(t.dtype)
