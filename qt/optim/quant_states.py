"""Block-wise quantization of optimizer states (Adam's exp_avg and exp_avg_sq).

A state of parameter shape ``(rows, ...)`` is stored as ``codes`` of shape ``(rows, row_bytes)`` and
``scales`` of shape ``(rows, row_numel // block_size)``: every dim-0 row is cut into whole blocks and
each block is divided by its absolute maximum before its values are encoded. Blocks never straddle
two rows, so a parameter sharded on dim 0 (FSDP2) shards its codes and scales the same way: every
rank quantizes exactly the blocks a single process would, and a sharded checkpoint loads at any
world size. States of small tensors, 1-D tensors, and tensors whose rows do not split into whole
blocks stay FP32 (`FP32_STATE`).

Encodings (docs/optimizers.md explains the choices):
- 8-bit: index of the nearest entry of bitsandbytes' dynamic code map, block 256.
- 4-bit: same with a 16-entry map (dynamic for exp_avg, linear without zero for exp_avg_sq),
  block 128, two codes per byte.
- FP8: the block divided by ``absmax / 448`` cast to float8_e4m3fn, block 256.
"""

import math

import torch
from torch import Tensor

# bitsandbytes' threshold: below it the saved bytes are not worth the quantization error.
MIN_QUANTIZED_NUMEL = 4096

# Keeps an all-zero block (a fresh state) at zero instead of dividing by zero.
_MIN_ABSMAX = torch.finfo(torch.float32).tiny

_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def dynamic_code_map(signed: bool, total_bits: int) -> list[float]:
    """bitsandbytes' dynamic tree quantization map (Dettmers et al., arXiv:2110.02861), ascending.

    The non-sign bits split into a decimal exponent and a linear fraction: exponent e covers
    magnitudes 10**(e - total_bits + 2) * (0.1, 1] in 2**e fraction steps (2**(e + 1) when
    unsigned, which spends the sign bit on precision). At 8 bits the map reaches down to 1e-6 of
    the block maximum, so the many small entries of a block keep a few significant digits where a
    linear map would flush them to zero.
    """
    values = [0.0, 1.0]
    for exponent in range(total_bits - 1):
        steps = 2**exponent if signed else 2 ** (exponent + 1)
        edges = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float64)
        magnitudes = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (exponent - total_bits + 2)).tolist()
        values += magnitudes + ([-m for m in magnitudes] if signed else [])
    return sorted(values)


def linear_code_map_without_zero(total_bits: int) -> list[float]:
    """(1/n, 2/n, ..., 1) for n = 2**total_bits: lpmm's map for the 4-bit second moment.

    Zero is left out on purpose (Li et al., arXiv:2309.01507, the "zero-point problem"): an
    exp_avg_sq rounded to zero turns the update exp_avg / (sqrt(0) + eps) into a huge step.
    """
    n = 2**total_bits
    return [i / n for i in range(1, n + 1)]


class FP32State:
    """The unquantized fallback: the state is an FP32 tensor of the parameter's shape."""

    def can_store(self, shape: torch.Size) -> bool:
        return True

    def code_map(self, device: torch.device) -> None:
        return None

    def zeros(self, shape: torch.Size, device: torch.device) -> tuple[Tensor, None]:
        return torch.zeros(shape, dtype=torch.float32, device=device), None

    def quantize(self, x: Tensor, code_map: None) -> tuple[Tensor, None]:
        return x, None

    def dequantize(self, codes: Tensor, scales: None, code_map: None) -> Tensor:
        return codes


class BlockQuantizer:
    """Per-block absmax scaling; subclasses encode the normalized values (in [-1, 1])."""

    def __init__(self, block_size: int, bits: int, code_dtype: torch.dtype):
        self.block_size = block_size
        self.bits = bits
        self.code_dtype = code_dtype

    def can_store(self, shape: torch.Size) -> bool:
        """Whether a state of this global parameter shape is quantized (else it stays FP32)."""
        if len(shape) < 2 or math.prod(shape) < MIN_QUANTIZED_NUMEL:
            return False
        return math.prod(shape[1:]) % self.block_size == 0

    def code_map(self, device: torch.device) -> Tensor | None:
        """What quantize/dequantize need on `device` besides the state (fetched outside torch.compile)."""
        return None

    def zeros(self, shape: torch.Size, device: torch.device) -> tuple[Tensor, Tensor]:
        """Codes and scales of an all-zero state for a (local) parameter shape."""
        return self.quantize(torch.zeros(shape, dtype=torch.float32, device=device), self.code_map(device))

    def quantize(self, x: Tensor, code_map: Tensor | None) -> tuple[Tensor, Tensor]:
        rows, row_numel = x.shape[0], math.prod(x.shape[1:])
        blocks = x.float().reshape(rows, row_numel // self.block_size, self.block_size)
        absmax = blocks.abs().amax(-1, keepdim=True).clamp_min(_MIN_ABSMAX)
        codes, scales = self._encode(blocks / absmax, absmax, code_map)
        return codes.reshape(rows, row_numel * self.bits // 8), scales.reshape(rows, row_numel // self.block_size)

    def dequantize(self, codes: Tensor, scales: Tensor, code_map: Tensor | None) -> Tensor:
        """FP32 values of shape (rows, row_numel); the caller views them as the parameter."""
        rows, blocks_per_row = scales.shape
        decoded = self._decode(codes, code_map).reshape(rows, blocks_per_row, self.block_size)
        return (decoded * scales.unsqueeze(-1)).reshape(rows, blocks_per_row * self.block_size)

    def _encode(self, normalized: Tensor, absmax: Tensor, code_map: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _decode(self, codes: Tensor, code_map: Tensor | None) -> Tensor:
        raise NotImplementedError


class CodeMapQuantizer(BlockQuantizer):
    """Each normalized value becomes the index of the nearest code map entry (uint8; 4-bit packed)."""

    def __init__(self, code_map: list[float], block_size: int):
        bits = int(math.log2(len(code_map)))
        if bits not in (4, 8) or len(code_map) != 2**bits:
            raise ValueError(f"a code map needs 16 or 256 entries, got {len(code_map)}")
        super().__init__(block_size, bits, torch.uint8)
        self._code_map = torch.tensor(code_map, dtype=torch.float32)
        self._code_map_by_device: dict[torch.device, Tensor] = {}

    def code_map(self, device: torch.device) -> Tensor:
        device = torch.device(device)
        if device not in self._code_map_by_device:
            self._code_map_by_device[device] = self._code_map.to(device)
        return self._code_map_by_device[device]

    def _encode(self, normalized: Tensor, absmax: Tensor, code_map: Tensor) -> tuple[Tensor, Tensor]:
        # Nearest entry = number of midpoints between consecutive entries lying below the value.
        midpoints = (code_map[1:] + code_map[:-1]) / 2
        codes = torch.bucketize(normalized, midpoints).to(torch.uint8)
        if self.bits == 4:
            codes = codes.reshape(-1, 2)
            codes = codes[:, 0] << 4 | codes[:, 1]
        return codes, absmax

    def _decode(self, codes: Tensor, code_map: Tensor) -> Tensor:
        if self.bits == 4:
            codes = torch.stack([codes >> 4, codes & 0xF], dim=-1)
        return code_map[codes.int()]


class Fp8Quantizer(BlockQuantizer):
    """Each block scaled so its absmax lands on E4M3's largest finite value (448), then cast."""

    def __init__(self, block_size: int):
        super().__init__(block_size, 8, torch.float8_e4m3fn)

    def _encode(self, normalized: Tensor, absmax: Tensor, code_map: None) -> tuple[Tensor, Tensor]:
        return (normalized * _FP8_MAX).to(torch.float8_e4m3fn), absmax / _FP8_MAX

    def _decode(self, codes: Tensor, code_map: None) -> Tensor:
        return codes.float()


FP32_STATE = FP32State()
# Block sizes: see docs/optimizers.md ("Block sizes").
SIGNED_8BIT = CodeMapQuantizer(dynamic_code_map(signed=True, total_bits=8), block_size=256)
UNSIGNED_8BIT = CodeMapQuantizer(dynamic_code_map(signed=False, total_bits=8), block_size=256)
SIGNED_4BIT = CodeMapQuantizer(dynamic_code_map(signed=True, total_bits=4), block_size=128)
UNSIGNED_4BIT = CodeMapQuantizer(linear_code_map_without_zero(total_bits=4), block_size=128)
FP8_E4M3 = Fp8Quantizer(block_size=256)
