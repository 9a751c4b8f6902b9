"""INT8 mixed precision: high-precision master weights, INT8 matmuls.

Each of a linear's three matmuls can run as a dynamically quantized INT8 matmul (see qt/linear.py):

    output      = X  @ W.T    X row-wise,     W row-wise
    grad_input  = dY @ W      dY row-wise,    W column-wise
    grad_weight = dY.T @ X    dY column-wise, X column-wise

The master is saved for the backward as it is (no extra memory) and quantized where each matmul runs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qt.config import RecipeConfig
from qt.kernels import quantize_int8
from qt.linear import HIGH_PRECISION, Int8Operand, LinearPlan, MatmulPlan
from qt.subclass import QuantizedWeight


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


class Int8MixedPrecisionWeight(QuantizedWeight):
    """A high-precision master weight whose linear runs in INT8. The master copy is exact, so
    optimizers, `state_dict`, `.to()` and `clone` see an ordinary tensor."""

    _inner_names = ("master",)

    @staticmethod
    @torch._dynamo.disable
    def __new__(cls, master: Tensor, config: Int8MixedPrecisionConfig):
        return QuantizedWeight._wrapper(cls, master, master.dtype)

    @torch._dynamo.disable
    def __init__(self, master: Tensor, config: Int8MixedPrecisionConfig):
        self.master = master
        self.config = config

    def _metadata(self):
        return (self.config,)

    def _forward_operands(self, dtype: torch.dtype, plan: LinearPlan):
        w = self.master.to(dtype)
        forward = Int8Operand(*quantize_int8(w, 1, plan.output.stochastic_rounding)).T if plan.output.int8 else w.T
        return forward, (self.master,)

    @staticmethod
    def _grad_input_operand(saved: tuple[Tensor, ...], dtype: torch.dtype, plan: LinearPlan):
        w = saved[0].to(dtype)
        return Int8Operand(*quantize_int8(w, 0, plan.grad_input.stochastic_rounding)) if plan.grad_input.int8 else w

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.master if dtype is None else self.master.to(dtype)

    def _update_(self, fn) -> None:
        fn(self.master)

    def _in_place_target(self) -> Tensor:
        return self.master

    def _to(self, device, dtype):
        return Int8MixedPrecisionWeight(self.master.to(device=device, dtype=dtype), self.config)

    def _new_zeros(self, size, device):
        return Int8MixedPrecisionWeight(self.master.new_zeros(size, device=device), self.config)

    # FSDP2: all-gather the master shard (in FSDP's param dtype when it has one) and wrap it.
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        dtype = mp_policy.param_dtype or self.master.dtype
        return (self.master.to(dtype),), None

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        (master,) = outputs
        if out is not None:  # FSDP re-filled the storage of `out.master` in place
            return None
        return Int8MixedPrecisionWeight(master, self.config), (master,)
