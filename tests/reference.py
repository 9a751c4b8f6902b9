"""Float64 references of the recipes' math, and error measures, shared by the tests."""

import torch


def fake_quant_int8(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Round-to-nearest abs-max INT8 quantize-dequantize along `axis`, in float64, with the scale
    rounded to x's dtype as the kernels store it."""
    amax = x.double().abs().amax(dim=axis, keepdim=True).clamp(min=1e-12)
    scale = (amax / 127).to(x.dtype).double()
    return (x.double() / scale).round().clamp(-127, 127) * scale


def ternary_fake_quant(w: torch.Tensor) -> torch.Tensor:
    scale = w.double().abs().mean().clamp(min=1e-5)
    return (w.double() / scale).round().clamp(-1, 1) * scale


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


def sqnr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    noise = (actual.double() - expected).norm()
    return (20 * torch.log10(expected.norm() / noise)).item()


# (mantissa bits, exponent of the smallest normal, largest finite value) of the FP8 formats.
FP8_FORMATS = {torch.float8_e4m3fn: (3, -6, 448.0), torch.float8_e5m2: (2, -14, 57344.0)}


def round_to_fp8(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `v` rounded to the nearest value of the FP8 format `dtype` (ties to even, subnormals included),
    saturating at its largest finite value; written from the format's definition, not with torch's cast."""
    mantissa_bits, min_exponent, largest = FP8_FORMATS[dtype]
    _, exponent = torch.frexp(v)  # v = m * 2**exponent with 0.5 <= |m| < 1
    quantum = torch.pow(2.0, (exponent - 1).clamp(min=min_exponent).double() - mantissa_bits)
    return (torch.round(v / quantum) * quantum).clamp(-largest, largest)


def fake_quant_fp8(x: torch.Tensor, axis: int, dtype: torch.dtype, tensorwise: bool = False,
                   power_of_two: bool = False) -> torch.Tensor:
    """Abs-max FP8 quantize-dequantize in float64: one scale per slice along `axis` (or one for the tensor),
    stored in float32 (or rounded up to a power of two)."""
    x = x.double()
    amax = (x.abs().amax() if tensorwise else x.abs().amax(dim=axis, keepdim=True)).clamp(min=1e-12)
    scale = amax / FP8_FORMATS[dtype][2]
    scale = torch.pow(2.0, torch.ceil(torch.log2(scale))) if power_of_two else scale.float().double()
    return round_to_fp8(x / scale, dtype) * scale
