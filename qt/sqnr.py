"""The forward SQNR of a model's quantized linear against its unquantized twin: the number every benchmark row
prints, so that a row whose recipe silently stopped quantizing shows it.

The twin computes the same linear in float64 from the high-precision weight the layer holds (its master or
latent weight). An INT8 path measures about 30-45 dB against it; a linear that quantizes nothing measures only
the rounding of its compute dtype (~55 dB in BF16, ~140 dB in FP32), above NOT_QUANTIZED_DB.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from qt.subclass import QuantizedWeight

# At or above this, a linear's output differs from its float64 twin by no more than rounding to BF16 does: it
# did not quantize.
NOT_QUANTIZED_DB = 50.0


@dataclasses.dataclass(frozen=True)
class ForwardSQNR:
    """`db` of linear `layer` (a module name); `quantized`: whether it runs a recipe; `stand_in`: measured on a
    random weight of its shape and scale, for a recipe that keeps no high-precision weight to compare with."""

    layer: str
    db: float
    quantized: bool
    stand_in: bool = False

    def __str__(self) -> str:
        what = self.layer if self.quantized else f"{self.layer} (not quantized)"
        note = " (on a random weight of its shape: its recipe keeps no high-precision copy)" if self.stand_in else ""
        return f"forward SQNR of {what} vs its unquantized twin: {self.db:.1f} dB{note}"


def sqnr_db(actual: Tensor, reference: Tensor) -> float:
    """Signal-to-quantization-noise ratio of `actual` against `reference`, in dB (inf when they are equal)."""
    reference = reference.double()
    noise = (actual.double() - reference).norm()
    return (20 * torch.log10(reference.norm() / noise)).item()  # one read of the device; x / 0 = inf


@torch.no_grad()
def twin_sqnr(forward, weight: Tensor, bias: Tensor | None, x: Tensor) -> float:
    """SQNR of `forward(x)` against `F.linear(x, weight, bias)` computed in float64."""
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return sqnr_db(forward(x), reference)


def random_input(features: int, tokens: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """A fixed standard-normal [tokens, features] input, drawn without touching the global RNG."""
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(tokens, features, generator=generator, device=device).to(dtype)


@torch.no_grad()
def forward_sqnr(model: nn.Module, dtype: torch.dtype | None = None, tokens: int = 256) -> ForwardSQNR | None:
    """The forward SQNR of `model`'s largest quantized linear (its largest linear when none is quantized; None
    when it has none) in `dtype` (default: the weight's), on a fixed random input. Leaves the RNG state as it
    was. Under FSDP2 it measures this rank's shard of the weight, without communication."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantized = [(name, m) for name, m in linears if isinstance(_local(m.weight), QuantizedWeight)]
    if not linears:
        return None
    name, linear = max(quantized or linears, key=lambda item: _local(item[1].weight).numel())
    weight, bias = _local(linear.weight), _local(linear.bias)
    dtype = dtype or weight.dtype
    devices = [weight.device] if weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # stochastic rounding draws from the global RNG
        x = random_input(weight.shape[1], tokens, weight.device, dtype)
        stand_in = isinstance(weight, QuantizedWeight) and weight._in_place_target() is None
        if stand_in:
            generator = torch.Generator(weight.device).manual_seed(1)
            scale = weight.dequantize(torch.float32).std()
            high_precision = (torch.randn(weight.shape, generator=generator, device=weight.device) * scale).to(weight.dtype)
            recipe = getattr(linear, "qt_recipe", None) or weight.config
            weight = recipe.quantize_weight(high_precision)
        else:
            high_precision = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight
        run_weight = weight if isinstance(weight, QuantizedWeight) else weight.to(dtype)
        run_bias = None if bias is None else bias.to(dtype)
        db = twin_sqnr(lambda inputs: F.linear(inputs, run_weight, run_bias), high_precision, bias, x)
    return ForwardSQNR(name.replace("_orig_mod.", ""), db, quantized=bool(quantized), stand_in=stand_in)


def sqnr_cell(db: float | None, expects_quantized: bool) -> str:
    """A table cell for a forward SQNR: flagged where a row that should quantize did not."""
    if db is None:
        return "n/a"
    flag = " (not quantized?)" if expects_quantized and db >= NOT_QUANTIZED_DB else ""
    return f"{db:.1f}{flag}"


def _local(tensor: Tensor | None) -> Tensor | None:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
