"""The weight of the mixed-precision recipes: a high-precision master, quantized where each matmul runs."""

from __future__ import annotations

import torch
from torch import Tensor

from qt.config import RecipeConfig
from qt.linear import LinearPlan, quantize_operand
from qt.subclass import QuantizedWeight


class MasterWeight(QuantizedWeight):
    """A high-precision master weight whose linear runs its config's plan: each matmul the plan quantizes
    (INT8 or FP8) gets the master quantized for it, where it runs. The master is saved for the backward as it
    is (no extra memory). The master copy is exact, so optimizers (torch's foreach and fused steps update it in
    place), `state_dict`, `.to()` and `clone` see an ordinary tensor."""

    _inner_names = ("master",)

    @staticmethod
    @torch._dynamo.disable
    def __new__(cls, master: Tensor, config: RecipeConfig):
        return QuantizedWeight._wrapper(cls, master, master.dtype)

    @torch._dynamo.disable
    def __init__(self, master: Tensor, config: RecipeConfig):
        self.master = master
        self.config = config

    def _metadata(self):
        return (self.config,)

    def _forward_operands(self, dtype: torch.dtype, plan: LinearPlan):
        w = self.master.to(dtype)
        forward = quantize_operand(w, 1, plan.output, "weight").T if plan.output.quantized else w.T
        return forward, (self.master,)

    @staticmethod
    def _grad_input_operand(saved: tuple[Tensor, ...], dtype: torch.dtype, plan: LinearPlan):
        w = saved[0].to(dtype)
        return quantize_operand(w, 0, plan.grad_input, "weight") if plan.grad_input.quantized else w

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.master if dtype is None else self.master.to(dtype)

    def _update_(self, fn) -> None:
        fn(self.master)

    def _in_place_target(self) -> Tensor:
        return self.master

    def _to(self, device, dtype):
        return type(self)(self.master.to(device=device, dtype=dtype), self.config)

    def _new_zeros(self, size, device):
        return type(self)(self.master.new_zeros(size, device=device), self.config)

    # FSDP2: all-gather the master shard (in FSDP's param dtype when it has one) and wrap it.
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        dtype = mp_policy.param_dtype or self.master.dtype
        return (self.master.to(dtype),), None

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        (master,) = outputs
        if out is not None:  # FSDP re-filled the storage of `out.master` in place
            return None
        return type(self)(master, self.config), (master,)
