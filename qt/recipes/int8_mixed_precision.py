"""INT8 mixed precision: high-precision master weights, INT8 matmuls.

Each of a linear's three matmuls can run as a dynamically quantized INT8 matmul (see qt/linear.py):

    output      = X  @ W.T    X row-wise,     W row-wise
    grad_input  = dY @ W      dY row-wise,    W column-wise
    grad_weight = dY.T @ X    dY column-wise (or per 128 tokens), X column-wise

The master is saved for the backward as it is (no extra memory) and quantized where each matmul runs. With
`int8_all_gather`, FSDP2 all-gathers the weight as the forward quantizes it (INT8 rows and their scales: about
half of BF16's bytes; qt/recipes/master_weight.py).
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
    matmuls, at the cost of more noise per step).

    `int8_all_gather`: under FSDP2, all-gather each weight as the forward quantizes it (INT8 rows with their
    scales, 1 + 4/in_features bytes an element against BF16's 2) instead of the master. The forward is unchanged
    (a row's scale is its own); grad_input then re-quantizes the gathered weight column-wise instead of the master
    (a second rounding). Off by default: on 2 H100s (TinyLlama-1.1B shape, compiled) it scaled to 82% of twice the
    one-GPU speed, where gathering the master has scaled to 90-92%; that was with its quantization in FSDP2's hooks
    twice a step, since moved to once a step after the optimizer step (`qt.prepare_all_gathers`), 87.4% against
    BF16's 91.5% (docs/scaling.md).

    `grad_weight_sees_quantized_input`: save X as the forward quantized it (INT8 rows, one byte an element) instead
    of X. With grad_weight in INT8, grad_weight comes from those codes, X's per-token scales folded into dY before
    its column-wise quantization (qt.linear.LinearPlan): the backward copies X's codes column-major
    (`qt.kernels.layout`) instead of quantizing X by columns, and the forward folds no column abs-max of X.
    None (the default) turns it on wherever output and grad_weight both run in INT8: 1.13x BF16 against 1.10x
    without it on an H200 (TinyLlama-1.1B shape, compiled; docs/benchmarks.md round 11). On the 124M convergence
    run, side by side on one GPU, its final validation loss was 3.429 against 3.438 without it (a rerun's spread:
    round 9 gave 3.428 without it). It rounds grad_weight differently: worse where a few channels of X hold
    outliers, better where tokens differ in size (tests/test_linear.py). False quantizes X by columns for
    grad_weight, as before round 11. With `grad_weight=False`, True gives grad_weight = dY.T @ dequantized X
    (BitNet's straight-through estimator).

    `grad_weight_token_blocks`: quantize grad_weight's dY with a scale per output feature per 128 tokens instead of
    one over all tokens (`MatmulPlan.k_block_scales`): finer where a few tokens' gradients are much larger than the
    rest, for one scale per 128 values more. dY's row-wise pass (grad_input) and its block pass are then two ops,
    each reading dY once, where the both-axes op read it twice in one. Off by default: on an H200 the matmul with
    these scales runs at 0.39-0.45x the plain INT8 matmul, below cuBLAS BF16 (docs/kernels.md, round 23)."""

    name = "int8_mixed_precision"
    output: bool = True
    grad_input: bool = True
    grad_weight: bool = True
    stochastic_rounding: bool = False
    int8_all_gather: bool = False
    grad_weight_sees_quantized_input: bool | None = None
    grad_weight_token_blocks: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.grad_weight_token_blocks and not self.grad_weight:
            raise ValueError(f"recipe '{self.name}' option grad_weight_token_blocks=True scales grad_weight's INT8 "
                             "operand: it needs grad_weight=True")
        if self.grad_weight_sees_quantized_input is None:
            object.__setattr__(self, "grad_weight_sees_quantized_input", self.output and self.grad_weight)
        for option in ("int8_all_gather", "grad_weight_sees_quantized_input"):
            if getattr(self, option) and not self.output:
                raise ValueError(f"recipe '{self.name}' option {option}=True uses what the forward quantizes: it "
                                 "needs output=True")

    def quantize_weight(self, weight: Tensor) -> Tensor:
        return Int8MixedPrecisionWeight(weight, self)

    @property
    def plan(self) -> LinearPlan:
        int8 = MatmulPlan("int8", self.stochastic_rounding)
        grad_weight = MatmulPlan("int8", self.stochastic_rounding, k_block_scales=self.grad_weight_token_blocks)
        return LinearPlan(int8 if self.output else HIGH_PRECISION, int8 if self.grad_input else HIGH_PRECISION,
                          grad_weight if self.grad_weight else HIGH_PRECISION,
                          grad_weight_sees_quantized_input=self.grad_weight_sees_quantized_input)

    @property
    def all_gather_plan(self) -> MatmulPlan | None:
        """The INT8 format FSDP2 all-gathers the weight in (qt.recipes.master_weight), or None for the master."""
        return self.plan.output if self.int8_all_gather else None


class Int8MixedPrecisionWeight(MasterWeight):
    """A high-precision master weight whose linear runs in INT8 (the config's plan)."""
