"""Low-memory optimizers: Adam(W) with 8-bit, 4-bit or FP8 states, BF16 stochastic rounding, and CPU
offload of any optimizer.

Every optimizer is importable as `qt.optim.<Name>`, which is how the training scripts resolve
`--optim NAME`. See docs/optimizers.md.
"""

from qt.optim.adam import Adam, Adam4bit, Adam8bit, AdamFp8, AdamW, AdamW4bit, AdamW8bit, AdamWFp8
from qt.optim.cpu_offload import CPUOffloadOptimizer
from qt.optim.stochastic_rounding import round_to_bf16_stochastic

__all__ = [
    "Adam",
    "AdamW",
    "Adam8bit",
    "AdamW8bit",
    "Adam4bit",
    "AdamW4bit",
    "AdamFp8",
    "AdamWFp8",
    "CPUOffloadOptimizer",
    "round_to_bf16_stochastic",
]
