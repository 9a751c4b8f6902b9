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
