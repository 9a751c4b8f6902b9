"""Which implementation a kernel call runs: Triton on CUDA, the torch fallback elsewhere.

`QT_KERNEL_BACKEND` overrides the choice, read at every call: `torch` forces the fallback (to
rule the kernels out while debugging), `triton` forces the Triton kernels also on CPU tensors,
which only works under Triton's CPU interpreter (`TRITON_INTERPRET=1`, set before importing qt):
the tests run the recipes through the kernels that way.
"""

import os

from torch import Tensor

_CHOICES = ("auto", "triton", "torch")


def use_triton(t: Tensor, triton_available: bool) -> bool:
    choice = os.environ.get("QT_KERNEL_BACKEND", "auto")
    if choice not in _CHOICES:
        raise ValueError(f"QT_KERNEL_BACKEND={choice!r}: use one of {', '.join(_CHOICES)}")
    if choice == "torch" or not triton_available:
        if choice == "triton":
            raise RuntimeError("QT_KERNEL_BACKEND=triton, but Triton is not installed: pip install triton")
        return False
    return choice == "triton" or t.is_cuda
