"""INT8 weight-only quantized training: the weight lives only as INT8 plus a row-wise scale.

There is no high-precision copy. The forward and backward upcast the INT8 weight to the
activation dtype (or, with `int8_activations`, quantize the activations and run the forward as an
INT8 matmul). An optimizer's in-place update dequantizes, applies the update in FP32 and
re-quantizes; with stochastic rounding (the default) an update smaller than half a quantization
step still moves the weight with the right probability, so it survives on average. torch's fused
Adam / AdamW does all of that in one kernel on a GPU (qt/kernels/int8_adam.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qt.config import RecipeConfig
from qt.kernels import quantize_int8
from qt.kernels.backend import traced
from qt.kernels.int8_adam import fused_step_supported, int8_rows_adam_step_
from qt.kernels.quantize import dequantize_rows
from qt.linear import HIGH_PRECISION, Int8Operand, LinearPlan, MatmulPlan
from qt.subclass import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class Int8WeightOnlyConfig(RecipeConfig):
    """`stochastic_rounding`: re-quantize updates stochastically (turning it off shows why it is
    needed: small updates round away). `int8_activations`: also quantize activations row-wise and
    run the forward matmul in INT8."""

    name = "int8_weight_only"
    stochastic_rounding: bool = True
    int8_activations: bool = False

    def quantize_weight(self, weight: Tensor) -> Tensor:
        int_data, scale = quantize_int8(weight.float(), 1)
        return Int8WeightOnlyWeight(int_data, scale, weight.dtype, self)

    @property
    def plan(self) -> LinearPlan:
        return LinearPlan(output=MatmulPlan("int8") if self.int8_activations else HIGH_PRECISION)


def matmul_dequantized_rows(a: Tensor, int_data: Tensor, scale: Tensor) -> Tensor:
    """a @ (int_data * scale), the dequantized weight made here and dropped after the matmul."""
    return a @ dequantize_rows(int_data, scale, a.dtype)


# The same as an op opaque to torch.compile (see Int8WeightOnlyWeight._grad_input).
torch.library.custom_op("qt::matmul_dequantized_rows", matmul_dequantized_rows, mutates_args=()).register_fake(
    lambda a, int_data, scale: a.new_empty((a.shape[0], int_data.shape[1])))


class Int8WeightOnlyWeight(QuantizedWeight):
    """INT8 data [out, in] with one FP32 scale per output row ([out, 1]); appears as `dtype`."""

    _inner_names = ("int_data", "scale")

    @staticmethod
    @torch._dynamo.disable
    def __new__(cls, int_data: Tensor, scale: Tensor, dtype: torch.dtype, config: Int8WeightOnlyConfig):
        return QuantizedWeight._wrapper(cls, int_data, dtype)

    @torch._dynamo.disable
    def __init__(self, int_data: Tensor, scale: Tensor, dtype: torch.dtype, config: Int8WeightOnlyConfig):
        self.int_data = int_data
        self.scale = scale.to(torch.float32)
        self.config = config

    def _metadata(self):
        return (self.dtype, self.config)

    def _forward_operands(self, dtype: torch.dtype, plan: LinearPlan):
        # Without INT8 activations: dequantize, then a plain matmul. Scaling the output instead would save a
        # weight-sized multiply, but Inductor rewrites that form into an INT8 weight-only inference kernel
        # whose lowering fails (torch 2.11-2.13). The INT8 rows are saved rather than their upcast, so no
        # high-precision copy outlives the forward.
        forward = Int8Operand(self.int_data, self.scale).T if plan.output.int8 else self.dequantize(dtype).T
        return forward, (self.int_data, self.scale)

    @classmethod
    def _grad_input(cls, saved: tuple[Tensor, ...], dy: Tensor, dtype: torch.dtype, plan: LinearPlan) -> Tensor:
        # Compiled, the backward's dequantized weight is the forward's (the same op on the same tensors), and
        # torch.compile's partitioner, which never recomputes a tensor a matmul reads, keeps that BF16 copy of every
        # weight from the forward to the backward: 2 bytes a parameter on top of the INT8 rows, which put the
        # recipe's peak memory above BF16's. An op that takes dy can only run in the backward.
        return (torch.ops.qt.matmul_dequantized_rows if traced(dy) else matmul_dequantized_rows)(dy, *saved)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_rows(self.int_data, self.scale, dtype or self.dtype)

    def _update_(self, fn) -> None:
        weight = self.dequantize(torch.float32)
        fn(weight)
        self._assign_(weight)

    def _fused_adam_step_(self, grad, exp_avg, exp_avg_sq, step, *, amsgrad, **hyperparameters) -> bool:
        if not fused_step_supported(self.int_data, amsgrad, exp_avg, exp_avg_sq):
            return False
        int8_rows_adam_step_(self.int_data, self.scale, grad, exp_avg, exp_avg_sq, step,
                             stochastic_rounding=self.config.stochastic_rounding, **hyperparameters)
        return True

    def _assign_(self, value: Tensor) -> None:
        int_data, scale = quantize_int8(value.to(torch.float32), 1, self.config.stochastic_rounding)
        self.int_data.copy_(int_data)
        self.scale.copy_(scale)

    def _to(self, device, dtype):
        return Int8WeightOnlyWeight(
            self.int_data.to(device=device), self.scale.to(device=device), dtype or self.dtype, self.config
        )

    def _new_zeros(self, size, device):
        device = device or self.device
        int_data = torch.zeros(size, dtype=torch.int8, device=device)
        scale = torch.zeros(size[0], 1, dtype=torch.float32, device=device)
        return Int8WeightOnlyWeight(int_data, scale, self.dtype, self.config)

    # FSDP2: all-gather the INT8 rows and their scales as they are (both shard along dim 0).
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        return (self.int_data, self.scale), None

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        if out is not None:  # FSDP re-filled the storage of `out`'s inner tensors in place
            return None
        int_data, scale = outputs
        return Int8WeightOnlyWeight(int_data, scale, param_dtype, self.config), (int_data, scale)
