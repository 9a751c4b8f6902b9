"""The weight of the mixed-precision recipes: a high-precision master, quantized where each matmul runs."""

from __future__ import annotations

import torch
from torch import Tensor

from qt.config import RecipeConfig
from qt.kernels.fp8 import E4M3, quantize_fp8
from qt.linear import LinearPlan, QuantizedOperand, quantize_operand, quantize_rows_keeping_amax
from qt.subclass import QuantizedWeight, keep_for_current_stream


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
        if not plan.output.quantized:
            return w.T, (self.master,)
        w_rows, amax = quantize_rows_keeping_amax(w, plan.output, plan.grad_input, "weight")
        return w_rows.T, (self.master,) if amax is None else (self.master, amax)

    @staticmethod
    def _grad_input_operand(saved: tuple[Tensor, ...], dtype: torch.dtype, plan: LinearPlan):
        w, amax = saved[0].to(dtype), saved[1] if len(saved) > 1 else None
        return quantize_operand(w, 0, plan.grad_input, "weight", amax) if plan.grad_input.quantized else w

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

    # FSDP2: all-gather the master shard (in FSDP's param dtype when it has one), or, where the config has an
    # `all_gather_plan`, the shard quantized as the forward quantizes the weight: one byte an element.
    @property
    def gathers_quantized(self) -> bool:
        return self.config.all_gather_plan is not None

    def _gather_statistic_source(self):
        plan = self.config.all_gather_plan
        return (self.master, "abs_max") if plan is not None and plan.scaling == "tensorwise" else None

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        dtype = mp_policy.param_dtype or self.master.dtype
        if not self.gathers_quantized:
            return (self.master.to(dtype),), None
        return self.quantized_gather_inputs(dtype, outer_size, mesh)

    def _quantized_gather_inputs(self, dtype, outer_size, mesh):
        shard = self.master.to(dtype)
        plan = self.config.all_gather_plan
        if plan.scaling == "tensorwise":
            # The abs-max of the whole weight; rounding is monotonic, so that of the master rounded to the
            # param dtype is that of the rounded master. The one scale travels as metadata.
            amax = self.whole_weight_statistic(mesh.get_group()).to(shard.dtype).float().view(1, 1)
            q, scale = quantize_fp8(shard, 1, E4M3, "tensorwise", plan.power_of_two_scales, amax)
            return (q.view(torch.uint8),), scale
        # Row-wise: each row's scale is its own, so the shards quantize exactly as the whole weight would.
        q, scale = quantize_operand(shard, 1, plan, "weight")
        return (q.view(torch.uint8), scale), None  # as bytes: every process group backend all-gathers them

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        plan = self.config.all_gather_plan
        if plan is None:
            (master,) = outputs
            if out is not None:  # FSDP re-filled the storage of `out.master` in place
                return None
            return type(self)(master, self.config), (master,)
        data, scale = (outputs[0], keep_for_current_stream(metadata)) if metadata is not None else outputs
        if out is not None:
            # FSDP re-gathered into the storage of `out`'s gathered tensors; a scale passed as metadata is copied
            # in. The backward may have saved it, so the refill must not look like a modification to autograd.
            if metadata is not None:
                with torch.autograd._unsafe_preserve_version_counter(out.scale):
                    out.scale.copy_(scale)
            return None
        q = data.view(E4M3 if plan.fp8 else torch.int8)
        return GatheredWeight(q, scale, param_dtype, self.config), (q,) if metadata is not None else (q, scale)


class GatheredWeight(QuantizedWeight):
    """A `MasterWeight` as FSDP2 un-shards it where its config all-gathers the forward's quantized weight: values
    `q` [out, in] (INT8 or FP8) and their scales (one per row, or one for the whole weight). The forward uses them
    as they are. grad_input does too where the scale is one for the whole weight; with row-wise scales it
    re-quantizes the dequantized weight along the other axis (a second rounding, the price of the smaller
    all-gather), or takes it dequantized where grad_input runs in high precision. Its gradient is what FSDP2
    reduce-scatters to the master shards."""

    _inner_names = ("q", "scale")

    @staticmethod
    @torch._dynamo.disable
    def __new__(cls, q: Tensor, scale: Tensor, dtype: torch.dtype, config: RecipeConfig):
        return QuantizedWeight._wrapper(cls, q, dtype)

    @torch._dynamo.disable
    def __init__(self, q: Tensor, scale: Tensor, dtype: torch.dtype, config: RecipeConfig):
        self.q = q
        self.scale = scale
        self.config = config

    def _metadata(self):
        return (self.dtype, self.config)

    def _forward_operands(self, dtype: torch.dtype, plan: LinearPlan):
        return QuantizedOperand(self.q, self.scale).T, (self.q, self.scale)

    @staticmethod
    def _grad_input_operand(saved: tuple[Tensor, ...], dtype: torch.dtype, plan: LinearPlan):
        q, scale = saved
        if scale.numel() == 1 and plan.grad_input.quantized:
            return QuantizedOperand(q, scale)
        w = _dequantize(q, scale, dtype)
        return quantize_operand(w, 0, plan.grad_input, "weight") if plan.grad_input.quantized else w

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return _dequantize(self.q, self.scale, dtype or self.dtype)

    def _update_(self, fn) -> None:
        raise RuntimeError("an all-gathered weight is rebuilt every all-gather; update the sharded master weight")

    def _to(self, device, dtype):
        return GatheredWeight(self.q.to(device=device), self.scale.to(device=device), dtype or self.dtype, self.config)

    def _new_zeros(self, size, device):
        raise RuntimeError("an all-gathered weight cannot be re-sharded; shard the master weight")


def _dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.float() * scale.float()).to(dtype)
