"""FP8 mixed precision: high-precision master weights, FP8 matmuls.

Each of a linear's three matmuls can run as a dynamically scaled FP8 matmul (see qt/linear.py), X and W in
E4M3 and the output gradient dY in E4M3 or E5M2:

    output      = X  @ W.T    X row-wise,     W row-wise       (or one scale each: tensor-wise)
    grad_input  = dY @ W      dY row-wise,    W column-wise
    grad_weight = dY.T @ X    dY column-wise, X column-wise

On CUDA GPUs of compute capability 8.9 or newer the matmuls run `torch._scaled_mm`; elsewhere an emulation
with the same numbers (qt/kernels/fp8.py). With tensor-wise scaling and `fp8_all_gather`, FSDP2 all-gathers the
weight in FP8 (one byte an element), scaled by the abs-max of the whole weight, and the forward and grad_input use
the gathered FP8 weight as it is (qt/recipes/master_weight.py).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from qt.config import RecipeConfig
from qt.kernels.fp8 import E4M3, E5M2, SCALINGS, fp8_kernel_unavailable
from qt.linear import HIGH_PRECISION, LinearPlan, MatmulPlan
from qt.recipes.master_weight import MasterWeight

GRAD_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}


@dataclasses.dataclass(frozen=True)
class Fp8MixedPrecisionConfig(RecipeConfig):
    """`scaling`: "tensorwise" (one scale per operand: the fastest) or "rowwise" (a scale per row or column, as
    INT8: more accurate with outliers). `fp8_all_gather`: with tensor-wise scales, FSDP2 all-gathers the weights
    in FP8 (half of BF16's bytes). Off by default: on 2 H100s (TinyLlama-1.1B shape, compiled) it scaled to 72%
    of twice the one-GPU speed, where gathering the master scaled to 86.5%, with its casts in FSDP2's hooks twice
    a step; with them once a step after the optimizer step (`qt.prepare_all_gathers`), 75.1% against 86.9%.
    (Its NaN loss on GPUs is gone since the gathered scale records the
    stream that reads it: 30 steps trained on 2 H100s and on 2 H200s.) `grad_dtype`: the FP8 format
    of the output gradient, "e4m3" or "e5m2" (more range, less precision); "auto" takes E5M2 with tensor-wise
    scales and E4M3 with row-wise ones, whose per-row scales leave less range to cover.
    `power_of_two_scales`: round every scale up to a power of two. `output`, `grad_input`, `grad_weight`: which
    matmuls run in FP8 (the others in the compute dtype); `grad_weight=False` with row-wise scaling is the
    variant that keeps grad_weight in high precision for stability. `grad_weight_sees_quantized_input`: grad_weight
    from X's FP8 codes as the forward cast them, saved instead of X (qt.linear.LinearPlan): row-wise, X's per-token
    scales fold into dY before its column-wise cast, and a transpose of X's codes replaces X's column-wise abs-max
    and cast (another rounding); tensor-wise, the same numbers as the default, a transpose of the codes replacing a
    second cast of X. None (the default) turns it on with row-wise scales where output and grad_weight both run in
    FP8: on an H100 (TinyLlama-1.1B shape, compiled, one call), 1.19x BF16 against 1.14x without it, since dY's
    casts run in qt's kernels, which fold X's scales into dY for free (docs/benchmarks.md round 18); the 124M
    convergence run's final validation loss was 3.4215 against BF16's 3.4319 (row-wise without it: 3.4236). Its
    cost: 3.5 GB more peak memory there (33.40 GB, BF16 34.69), X's codes saved beside what the backward keeps of X.
    Tensor-wise it stays off: the same speed (round 12) for that memory."""

    name = "fp8_mixed_precision"
    scaling: str = "tensorwise"
    grad_dtype: str = "auto"
    power_of_two_scales: bool = False
    output: bool = True
    grad_input: bool = True
    grad_weight: bool = True
    fp8_all_gather: bool = False
    grad_weight_sees_quantized_input: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.grad_weight_sees_quantized_input is None:
            object.__setattr__(self, "grad_weight_sees_quantized_input",
                               self.scaling == "rowwise" and self.output and self.grad_weight)
        for option, choices in (("scaling", SCALINGS), ("grad_dtype", ("auto", *GRAD_DTYPES))):
            value = getattr(self, option)
            if value not in choices:
                raise ValueError(f"recipe '{self.name}' option {option}={value!r}: use one of {', '.join(choices)}")
        if self.grad_weight_sees_quantized_input and not (self.output and self.grad_weight):
            raise ValueError(f"recipe '{self.name}' option grad_weight_sees_quantized_input=True reads the forward's "
                             "FP8 codes in grad_weight: it needs output=True and grad_weight=True")

    def quantize_weight(self, weight: Tensor) -> Tensor:
        return Fp8MixedPrecisionWeight(weight, self)

    @property
    def plan(self) -> LinearPlan:
        grad_dtype = self.grad_dtype
        if grad_dtype == "auto":
            grad_dtype = "e5m2" if self.scaling == "tensorwise" else "e4m3"
        backward = MatmulPlan("fp8", scaling=self.scaling, grad_dtype=GRAD_DTYPES[grad_dtype],
                              power_of_two_scales=self.power_of_two_scales)
        # The forward accumulates in the kernel's fast mode, the gradients in full precision (as torchao does).
        output = MatmulPlan("fp8", scaling=self.scaling, power_of_two_scales=self.power_of_two_scales,
                            fast_accumulation=True)
        return LinearPlan(output if self.output else HIGH_PRECISION, backward if self.grad_input else HIGH_PRECISION,
                          backward if self.grad_weight else HIGH_PRECISION,
                          grad_weight_sees_quantized_input=self.grad_weight_sees_quantized_input)

    @property
    def all_gather_plan(self) -> MatmulPlan | None:
        """The FP8 format FSDP2 all-gathers the weight in (qt.recipes.master_weight), or None for the master: FP8
        where asked for and both matmuls that read the weight scale it tensor-wise (they share the gathered one)."""
        gathers_fp8 = self.fp8_all_gather and self.scaling == "tensorwise" and self.output and self.grad_input
        return self.plan.output if gathers_fp8 else None

    def incompatibility(self, linear: nn.Linear) -> str | None:
        weight = linear.weight
        if not weight.is_floating_point():
            return f"its weight is {weight.dtype}, not a floating-point tensor"
        # The emulation runs anywhere; only a forced kernel needs the hardware (a CPU weight may move to it).
        return fp8_kernel_unavailable(weight.device) if weight.is_cuda else None


class Fp8MixedPrecisionWeight(MasterWeight):
    """A high-precision master weight whose linear runs in FP8 (the config's plan)."""
