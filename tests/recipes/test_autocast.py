"""Every recipe under bf16 autocast."""

import pytest
import torch

import qt
from tests.recipes.linear_harness import make_case, run_linear
from tests.reference import rel_err


@pytest.mark.parametrize("recipe", list(qt.RECIPES))
def test_bf16_autocast_is_close_to_fp32(recipe):
    """Under bf16 autocast the recipes compute in bf16: same math up to bf16 rounding."""
    linear, x, dy = make_case((4, 9), True)
    qt.quantize_(linear, recipe, filter_fn=lambda m, n: True)
    out32, gx32, gw32, _ = run_linear(linear, x, dy)
    linear.weight.grad = None
    linear.bias.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, gx16, gw16, _ = run_linear(linear, x, dy)
    assert out16.dtype == torch.bfloat16
    # bf16 has an 8-bit mantissa: per-element error ~2^-9, a few of them compound in the matmuls
    # and a re-quantization of bf16-rounded activations can flip an INT8 code.
    for lo, hi in [(out16, out32), (gx16, gx32), (gw16, gw32)]:
        assert rel_err(lo, hi) < 3e-2
