"""Block-wise state quantization against brute-force references."""

import pytest
import torch

from qt.optim import quant_states
from qt.optim.quant_states import (
    FP8_E4M3,
    SIGNED_4BIT,
    SIGNED_8BIT,
    UNSIGNED_4BIT,
    UNSIGNED_8BIT,
    dynamic_code_map,
)

MAP_QUANTIZERS = {"signed_8bit": SIGNED_8BIT, "unsigned_8bit": UNSIGNED_8BIT, "signed_4bit": SIGNED_4BIT, "unsigned_4bit": UNSIGNED_4BIT}
ALL_QUANTIZERS = MAP_QUANTIZERS | {"fp8_e4m3": FP8_E4M3}


def _state_like(quantizer, rows=24, row_numel=512, seed=0) -> torch.Tensor:
    """Values spread over several orders of magnitude, like Adam moments; >= 0 for unsigned maps."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, row_numel, generator=generator) * torch.exp(2 * torch.randn(rows, row_numel, generator=generator))
    return x.abs() if quantizer in (UNSIGNED_8BIT, UNSIGNED_4BIT) else x


def test_dynamic_code_map_4bit_by_hand():
    # Exponent e spans 10**(e-2) * (0.1, 1] in 2**e steps, each value the middle of its step.
    magnitudes = [0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875]
    expected = sorted([0.0, 1.0] + magnitudes + [-m for m in magnitudes])
    torch.testing.assert_close(torch.tensor(dynamic_code_map(signed=True, total_bits=4)), torch.tensor(expected))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_code_map_8bit_shape(signed):
    code_map = torch.tensor(dynamic_code_map(signed=signed, total_bits=8), dtype=torch.float64)
    assert code_map.numel() == 256 and code_map.unique().numel() == 256
    assert code_map.max() == 1.0 and (code_map.min() < 0) == signed
    smallest = code_map[code_map > 0].min().item()
    # The first decade, 1e-6 * (0.1, 1], has one step signed (middle 0.55) and two unsigned (0.325, 0.775).
    assert smallest == pytest.approx(0.55e-6 if signed else 0.325e-6)


@pytest.mark.parametrize("name", MAP_QUANTIZERS)
def test_code_map_quantization_matches_nearest_code(name):
    quantizer = MAP_QUANTIZERS[name]
    x = _state_like(quantizer)
    code_map = quantizer.code_map("cpu")
    codes, scales = quantizer.quantize(x, code_map)

    blocks = x.reshape(x.shape[0], -1, quantizer.block_size)
    absmax = blocks.abs().amax(-1)
    nearest = (blocks.unsqueeze(-1) / absmax[..., None, None] - code_map).abs().argmin(-1)
    torch.testing.assert_close(scales, absmax, rtol=0, atol=0)
    expected = code_map[nearest].mul(absmax.unsqueeze(-1)).reshape(x.shape)
    torch.testing.assert_close(quantizer.dequantize(codes, scales, code_map), expected, rtol=0, atol=0)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() * quantizer.bits // 8


def test_fp8_quantization_matches_nearest_e4m3_value():
    x = _state_like(FP8_E4M3)
    codes, scales = FP8_E4M3.quantize(x, None)

    every_byte = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3_values = every_byte[every_byte.isfinite()]
    blocks = x.reshape(x.shape[0], -1, FP8_E4M3.block_size)
    block_scale = blocks.abs().amax(-1) / 448
    normalized = blocks / block_scale[..., None]
    nearest = e4m3_values[(normalized.unsqueeze(-1) - e4m3_values).abs().argmin(-1)]
    assert codes.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(scales, block_scale, rtol=0, atol=0)
    torch.testing.assert_close(codes.float().reshape(nearest.shape), nearest, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_QUANTIZERS)
def test_rows_quantize_independently(name):
    """What FSDP2 relies on: quantizing a slice of rows gives that slice of the codes and scales."""
    quantizer = ALL_QUANTIZERS[name]
    x = _state_like(quantizer, rows=9)
    code_map = quantizer.code_map("cpu")
    codes, scales = quantizer.quantize(x, code_map)
    shard_codes, shard_scales = quantizer.quantize(x[5:], code_map)
    assert torch.equal(shard_codes.view(torch.uint8), codes[5:].view(torch.uint8))
    assert torch.equal(shard_scales, scales[5:])


@pytest.mark.parametrize("name", ALL_QUANTIZERS)
def test_zero_state_dequantizes_to_zero(name):
    quantizer = ALL_QUANTIZERS[name]
    code_map = quantizer.code_map("cpu")
    codes, scales = quantizer.zeros((16, 256), "cpu")
    # The 4-bit second-moment map has no zero: its smallest code times the tiny floor scale.
    assert quantizer.dequantize(codes, scales, code_map).abs().max() < 1e-37


@pytest.mark.parametrize(
    "shape, quantized",
    [((16, 256), True), ((4, 4, 256), True), ((8, 256), False), ((4096,), False), ((64, 100), False)],
)
def test_which_shapes_are_quantized(shape, quantized):
    # >= 4096 elements, at least 2-D, and every dim-0 row a whole number of 256-blocks.
    assert SIGNED_8BIT.can_store(torch.Size(shape)) == quantized


def test_quantized_states_are_small():
    codes, scales = SIGNED_4BIT.zeros((64, 1024), "cpu")
    bytes_per_value = (codes.nbytes + scales.nbytes) / (64 * 1024)
    assert bytes_per_value == 0.5 + 4 / 128
    assert quant_states.MIN_QUANTIZED_NUMEL == 4096
