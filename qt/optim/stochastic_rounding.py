"""FP32 -> BF16 stochastic rounding, for updating pure-BF16 weights without an FP32 master copy.

Round-to-nearest drops every update smaller than half a BF16 ulp of the weight (2**-9 relative),
so with a small learning rate BF16 weights stop moving. Rounding up with probability equal to the
dropped fraction keeps the expected weight equal to the FP32 result (Gupta et al., 2015).
"""

import torch
from torch import Tensor

# BF16 is the upper half of an FP32; these are the bits it drops (as int32: 0xFFFF0000 == -65536).
_DROPPED_BITS = 1 << 16
_KEPT_BITS_MASK = -_DROPPED_BITS


def round_to_bf16_stochastic(x: Tensor) -> Tensor:
    """BF16 tensor equal to x rounded away from zero with probability (dropped bits) / 2**16."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding to BF16 takes an FP32 tensor, got {x.dtype}")
    # Adding a uniform 16-bit integer carries into the kept bits exactly with that probability;
    # on the sign-magnitude bit pattern "up" means away from zero for negative values too.
    noise = torch.randint(0, _DROPPED_BITS, x.shape, dtype=torch.int32, device=x.device)
    bits = (x.view(torch.int32) + noise) & _KEPT_BITS_MASK
    return bits.view(torch.float32).to(torch.bfloat16)
