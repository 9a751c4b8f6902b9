"""Adam and AdamW with FP32, 8-bit, 4-bit or FP8 states, and optional BF16 stochastic rounding.

All variants run the same FP32 math per parameter (`_adam_param_step`); they differ only in how
exp_avg and exp_avg_sq are stored between steps (see quant_states.py). States live in
`optimizer.state[p]` as plain tensors (or DTensors wrapping plain local tensors under FSDP2):

    step            0-d FP32 tensor on CPU
    exp_avg         FP32 tensor shaped like p, or codes (uint8 / float8_e4m3fn) of shape (rows, row_bytes)
    exp_avg_scale   per-block FP32 scales of shape (rows, blocks_per_row); only when quantized
    exp_avg_sq, exp_avg_sq_scale   the same for the second moment

Plain tensors keep `state_dict()` a dict of ordinary tensors that torch.save, the DCP planner and
`get_optimizer_state_dict` handle without any tensor-subclass support, and that torch.compile
sees as ordinary inputs (docs/optimizers.md, "Why plain tensors").
"""

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim import Optimizer

from qt.optim import quant_states
from qt.optim.quant_states import FP32_STATE, BlockQuantizer, FP32State
from qt.optim.stochastic_rounding import round_to_bf16_stochastic

# Each parameter shape (and state layout) compiles its own graph; a model has a handful of
# shapes, more than dynamo's default of 8 recompiles per function.
_MAX_COMPILED_GRAPHS = 64
# The most elements one step call updates (see _AdamBase._step_param): 64 MiB per FP32 temporary.
_MAX_STEP_ELEMENTS = 2**24


class _StoredState(NamedTuple):
    """One Adam moment as stored, with what its quantizer needs to load and store it."""

    quantizer: FP32State | BlockQuantizer
    codes: Tensor
    scales: Tensor | None
    code_map: Tensor | None

    def load(self, shape: torch.Size) -> Tensor:
        return self.quantizer.dequantize(self.codes, self.scales, self.code_map).view(shape)

    def store_(self, value: Tensor) -> None:
        codes, scales = self.quantizer.quantize(value, self.code_map)
        self.codes.copy_(codes)
        if self.scales is not None:
            self.scales.copy_(scales)


def _adam_param_step(
    param: Tensor,
    grad: Tensor,
    step: Tensor,
    lr: Tensor,
    exp_avg: _StoredState,
    exp_avg_sq: _StoredState,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    bf16_stochastic_round: bool,
) -> None:
    """One Adam(W) update of a plain local tensor, in FP32, written back into `param` in place."""
    param_fp32 = param.float()
    grad = grad.float()
    if weight_decay != 0 and not decoupled_weight_decay:
        grad = grad + weight_decay * param_fp32

    new_exp_avg = exp_avg.load(param.shape).lerp(grad, 1 - beta1)
    new_exp_avg_sq = exp_avg_sq.load(param.shape) * beta2 + grad.square() * (1 - beta2)
    exp_avg.store_(new_exp_avg)
    exp_avg_sq.store_(new_exp_avg_sq)

    # The step uses the unquantized new moments: quantization error enters only through the
    # stored history, as in bitsandbytes and torchao.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = new_exp_avg_sq.sqrt() / bias_correction2.sqrt() + eps
    if weight_decay != 0 and decoupled_weight_decay:
        param_fp32 = param_fp32 * (1 - lr * weight_decay)
    param_fp32 = param_fp32 - (lr / bias_correction1) * new_exp_avg / denom

    if bf16_stochastic_round and param.dtype == torch.bfloat16:
        param.copy_(round_to_bf16_stochastic(param_fp32))
    else:
        param.copy_(param_fp32)


_compiled_adam_param_step = None


def _get_compiled_adam_param_step():
    global _compiled_adam_param_step
    if _compiled_adam_param_step is None:
        # dynamic=False: one graph per shape, each fully specialized; lr and step are tensor
        # inputs, so changing them never recompiles.
        _compiled_adam_param_step = torch.compile(_adam_param_step, dynamic=False)
    return _compiled_adam_param_step


def _is_plain_tensor(t: Tensor) -> bool:
    return type(t) in (Tensor, nn.Parameter)


class _AdamBase(Optimizer):
    """Adam(W) whose moments are stored by `exp_avg_quantizer` / `exp_avg_sq_quantizer`.

    Works on any parameter whose in-place `copy_` accepts an FP32 tensor: plain FP32/BF16 tensors,
    FSDP2's DTensors, and tensor subclasses such as qt's int8_weight_only weights (updated through
    an FP32 copy: their own `copy_` re-quantizes them).
    """

    exp_avg_quantizer: FP32State | BlockQuantizer = FP32_STATE
    exp_avg_sq_quantizer: FP32State | BlockQuantizer = FP32_STATE
    decoupled_weight_decay = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        *,
        bf16_stochastic_round: bool = False,
        compile_step: bool | None = None,
    ):
        """
        Args:
            weight_decay: defaults to 1e-2 for the AdamW variants (decoupled, like torch.optim.AdamW)
                and 0 for the Adam variants (added to the gradient, like torch.optim.Adam).
            bf16_stochastic_round: write BF16 parameters with stochastic rounding, so updates far
                below a BF16 ulp still move the weights on average (for pure-BF16 training).
            compile_step: torch.compile the per-parameter step (one graph per shape). None
                compiles for GPU parameters and runs eagerly on CPU, where compile time dominates.
        """
        if weight_decay is None:
            weight_decay = 1e-2 if self.decoupled_weight_decay else 0.0
        if not float(lr) >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.bf16_stochastic_round = bf16_stochastic_round
        self.compile_step = compile_step
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # A tensor lr is a graph input, so LR schedulers (which fill_ tensor lrs in place) do not
        # recompile the step. Each group gets its own tensor: the default would be shared.
        group = self.param_groups[-1]
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch.optim casts floating-point states to the parameter's dtype; ours keep their own
        # (FP32 moments and scales, FP8 codes), so they are taken again from the saved ones,
        # matched to parameters by position as torch does. Copies, so that training does not
        # write into the caller's state dict (or into the optimizer it came from).
        saved_keys = [key for group in state_dict["param_groups"] for key in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for p, saved_key in zip(params, saved_keys):
            if saved_key in state_dict["state"]:
                saved = state_dict["state"][saved_key]
                self.state[p] = {key: value.to(device=p.device, copy=True) if key != "step" else value.clone() for key, value in saved.items()}
                self._check_loaded_state(p, self.state[p])
        for group in self.param_groups:
            # The loaded groups hold the saved lr objects: same reason for a copy.
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = torch.as_tensor(group["lr"], dtype=torch.float32)  # also accepts a float set by hand
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                self._step_param(p, state, lr, beta1, beta2, group["eps"], group["weight_decay"])
        return loss

    def _quantizers(self, p: Tensor):
        """(exp_avg, exp_avg_sq) quantizers for p, from its global shape so all ranks agree."""
        return tuple(q if q.can_store(p.shape) else FP32_STATE for q in (self.exp_avg_quantizer, self.exp_avg_sq_quantizer))

    def _init_state(self, p: Tensor, state: dict[str, Tensor]) -> None:
        local_p = p.to_local() if isinstance(p, DTensor) else p
        # FP32 whatever torch's default dtype: a BF16 count stops at 256 and makes 1 - beta1**1 round to 0.
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for name, quantizer in zip(("exp_avg", "exp_avg_sq"), self._quantizers(p)):
            codes, scales = quantizer.zeros(local_p.shape, local_p.device)
            state[name] = _shard_like(codes, p, quantized=quantizer is not FP32_STATE)
            if scales is not None:
                state[f"{name}_scale"] = _shard_like(scales, p, quantized=True)

    def _check_loaded_state(self, p: Tensor, state: dict[str, Tensor]) -> None:
        local_p = p.to_local() if isinstance(p, DTensor) else p
        for name, quantizer in zip(("exp_avg", "exp_avg_sq"), self._quantizers(p)):
            codes, scales = quantizer.zeros(local_p.shape, "meta")
            expected = {name: codes} | ({f"{name}_scale": scales} if scales is not None else {})
            for key, like in expected.items():
                got = state.get(key)
                got = got.to_local() if isinstance(got, DTensor) else got
                if got is None or got.shape != like.shape or got.dtype != like.dtype:
                    raise ValueError(
                        f"{type(self).__name__}: loaded state '{key}' of a parameter of shape {tuple(p.shape)} "
                        f"should be {like.dtype} {tuple(like.shape)}, got "
                        f"{None if got is None else (got.dtype, tuple(got.shape))}: load a state dict "
                        f"saved by {type(self).__name__}"
                    )

    def _step_param(self, p, state, lr, beta1, beta2, eps, weight_decay) -> None:
        local = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}
        param = p.to_local() if isinstance(p, DTensor) else p
        if param.numel() == 0:  # an empty parameter, or the FSDP2 shard of one with fewer rows than ranks
            return
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        quantizers = dict(zip(("exp_avg", "exp_avg_sq"), self._quantizers(p)))
        code_maps = {name: quantizer.code_map(param.device) for name, quantizer in quantizers.items()}
        compile_step = param.is_cuda if self.compile_step is None else self.compile_step
        kwargs = dict(decoupled_weight_decay=self.decoupled_weight_decay, bf16_stochastic_round=self.bf16_stochastic_round)
        # The step's FP32 temporaries are several times the size of what it steps, so a large
        # parameter (an embedding, an LM head) stepped whole would put them all on the memory peak.
        # Every state is laid out by the parameter's rows (quantization blocks never cross one), so
        # slices of rows step independently.
        rows_per_slice = max(1, _MAX_STEP_ELEMENTS // max(1, param[0].numel())) if param.dim() else 1
        for start in range(0, max(1, param.shape[0] if param.dim() else 1), rows_per_slice):
            rows = slice(start, start + rows_per_slice) if param.dim() else slice(None)
            param_rows = param[rows] if param.dim() else param
            moments = [
                _StoredState(quantizer, _rows(local[name], rows), _rows(local.get(f"{name}_scale"), rows), code_maps[name])
                for name, quantizer in quantizers.items()
            ]
            # Tensor subclasses (e.g. qt's int8 weights) run their own copy_, which the compiled step
            # cannot trace: they are stepped through a plain FP32 copy (copy_ into a plain tensor
            # reads any weight as its high-precision value), then copied back.
            if _is_plain_tensor(param):
                target = param_rows
            else:
                target = torch.empty(param_rows.shape, dtype=torch.float32, device=param.device).copy_(param_rows)
            args = (target, _rows(grad, rows), local["step"], lr, *moments, beta1, beta2, eps, weight_decay)
            if compile_step:
                with torch._dynamo.config.patch(recompile_limit=_MAX_COMPILED_GRAPHS):
                    _get_compiled_adam_param_step()(*args, **kwargs)
            else:
                _adam_param_step(*args, **kwargs)
            if target is not param_rows:
                param_rows.copy_(target)


def _rows(t: Tensor | None, rows: slice) -> Tensor | None:
    return t if t is None or t.dim() == 0 else t[rows]


def _shard_like(local_state: Tensor, p: Tensor, quantized: bool) -> Tensor:
    """Wrap a local state tensor as a DTensor laid out like the DTensor parameter p."""
    if not isinstance(p, DTensor):
        return local_state
    if not quantized:
        return DTensor.from_local(local_state, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    if any(not (placement == Shard(0) or isinstance(placement, Replicate)) for placement in p.placements):
        raise ValueError(
            f"quantized optimizer states need parameters sharded on dim 0 (FSDP2) or replicated, got "
            f"placements {p.placements}: use the FP32 qt.optim.AdamW for this model"
        )
    # Codes and scales keep the parameter's rows, so dim-0 sharding splits them like the parameter.
    shape = (p.shape[0], *local_state.shape[1:])
    stride = (local_state.shape[1], 1)
    return DTensor.from_local(local_state, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


class Adam(_AdamBase):
    """torch.optim.Adam's update with FP32 states, plus `bf16_stochastic_round` for BF16 weights."""


class AdamW(Adam):
    """torch.optim.AdamW's update with FP32 states, plus `bf16_stochastic_round` for BF16 weights."""

    decoupled_weight_decay = True


class Adam8bit(_AdamBase):
    """Adam with 8-bit block-wise states (dynamic code maps, block 256): 2 bytes per parameter."""

    exp_avg_quantizer = quant_states.SIGNED_8BIT
    exp_avg_sq_quantizer = quant_states.UNSIGNED_8BIT


class AdamW8bit(Adam8bit):
    """AdamW with 8-bit block-wise states (dynamic code maps, block 256): 2 bytes per parameter."""

    decoupled_weight_decay = True


class Adam4bit(_AdamBase):
    """Adam with 4-bit block-wise states (dynamic / linear code maps, block 128): 1 byte per parameter."""

    exp_avg_quantizer = quant_states.SIGNED_4BIT
    exp_avg_sq_quantizer = quant_states.UNSIGNED_4BIT


class AdamW4bit(Adam4bit):
    """AdamW with 4-bit block-wise states (dynamic / linear code maps, block 128): 1 byte per parameter."""

    decoupled_weight_decay = True


class AdamFp8(_AdamBase):
    """Adam with FP8 E4M3 states scaled per block of 256: 2 bytes per parameter."""

    exp_avg_quantizer = quant_states.FP8_E4M3
    exp_avg_sq_quantizer = quant_states.FP8_E4M3


class AdamWFp8(AdamFp8):
    """AdamW with FP8 E4M3 states scaled per block of 256: 2 bytes per parameter."""

    decoupled_weight_decay = True
