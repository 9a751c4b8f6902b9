"""INT8 mixed precision: high-precision master weights, INT8 matmuls.

Each of a linear's three matmuls can run as a dynamically quantized INT8 matmul (see qt/linear.py):

    output      = X  @ W.T    X row-wise,     W row-wise
    grad_input  = dY @ W      dY row-wise,    W column-wise
    grad_weight = dY.T @ X    dY column-wise, X column-wise

The master is saved for the backward as it is (no extra memory) and quantized where each matmul runs.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from qt.config import RecipeConfig
from qt.linear import HIGH_PRECISION, LinearPlan, MatmulPlan
from qt.recipes.master_weight import MasterWeight


@dataclasses.dataclass(frozen=True)
class Int8MixedPrecisionConfig(RecipeConfig):
    """`output`, `grad_input`, `grad_weight`: which matmuls run in INT8 (the others run in the
    compute dtype). `stochastic_rounding`: round every quantized operand stochastically (unbiased
    matmuls, at the cost of more noise per step)."""

    name = "int8_mixed_precision"
    output: bool = True
    grad_input: bool = True
    grad_weight: bool = True
    stochastic_rounding: bool = False

    def quantize_weight(self, weight: Tensor) -> Tensor:
        return Int8MixedPrecisionWeight(weight, self)

    @property
    def plan(self) -> LinearPlan:
        int8 = MatmulPlan("int8", self.stochastic_rounding)
        return LinearPlan(*(int8 if on else HIGH_PRECISION for on in (self.output, self.grad_input, self.grad_weight)))


class Int8MixedPrecisionWeight(MasterWeight):
    """A high-precision master weight whose linear runs in INT8 (the config's plan)."""
