"""BitNet b1.58: ternary weights, INT8 activations, straight-through training of latent weights.

Forward (per the BitNet b1.58 paper and its training tips):
    w_scale = mean(|W|)                      one scale for the whole tensor
    W_t     = clamp(round(W / w_scale), -1, 1)        ternary {-1, 0, +1}
    X_q, x_scale = row-wise abs-max INT8 quantization of X
    out     = (X_q @ W_t.T) * x_scale * w_scale       one INT8 matmul
Backward: the straight-through estimator treats both quantizers as the identity, so
    grad_input  = dY @ (W_t * w_scale)
    grad_weight = dY.T @ (X_q * x_scale)    (flows to the latent high-precision weight)
which is exactly the gradient of the reference `x + (quant(x) - x).detach()` formulation. In
qt/linear.py's terms: `BITNET_PLAN`, with the weight operands below. By default (`int8_backward`) the two backward
matmuls run in INT8 as well (`BITNET_INT8_BACKWARD_PLAN`): grad_input = Q(dY) @ W_t * w_scale (the ternary codes
are exact in INT8, only dY is rounded) and grad_weight from X's codes, X's per-token scales folded into dY's
column-wise quantization, as `int8_mixed_precision` does by default.

`convert_llama_to_bitnet` does the model surgery the training tips call for, after `quantize_`: in each decoder
layer with a BitNet linear, an RMSNorm before each linear (BitNet's "SubLN") and the layer's own RMSNorms removed.
A SubLN before a linear left in high precision does not keep its output for the backward (`SubLNLinear`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from qt.config import RecipeConfig
from qt.kernels import to_column_major
from qt.linear import Int8Operand, LinearPlan, MatmulPlan
from qt.subclass import QuantizedWeight, keep_for_current_stream

_MIN_WEIGHT_SCALE = 1e-5  # the reference implementation's clamp: keeps an all-zero weight finite
# The forward in INT8 (X row-wise, the ternary weight); the backward in high precision, straight through.
BITNET_PLAN = LinearPlan(output=MatmulPlan("int8"), grad_weight_sees_quantized_input=True)
# The straight-through backward with its two matmuls in INT8 too (`int8_backward`), and with grad_weight's dY
# scaled per 128 tokens (`grad_weight_token_blocks`).
BITNET_INT8_BACKWARD_PLAN = LinearPlan(*[MatmulPlan("int8")] * 3, grad_weight_sees_quantized_input=True)
BITNET_INT8_BACKWARD_TOKEN_BLOCKS_PLAN = dataclasses.replace(
    BITNET_INT8_BACKWARD_PLAN, grad_weight=MatmulPlan("int8", k_block_scales=True))


@dataclasses.dataclass(frozen=True)
class BitNetConfig(RecipeConfig):
    """BitNet b1.58's quantizers are fixed by the method. `ternary_all_gather`: under FSDP2, all-gather each
    weight ternarized, four values to a byte (an eighth of BF16's bytes; each shard ternarized with the whole
    weight's mean |W|), instead of the latent weight, which the forward then ternarizes as on one GPU. Off by
    default: on 2 H100s (TinyLlama-1.1B shape) it scaled to 69% of twice the one-GPU speed, against 92% for
    BF16, with its packing in FSDP2's hooks twice a step (since moved to once a step after the optimizer step,
    `qt.prepare_all_gathers`, not re-measured) and its unpacking there at every all-gather; gathering the latent
    weight scaled to 90.2% (BF16: 91.5%, docs/scaling.md).

    `int8_backward` (on by default): run grad_input and grad_weight as INT8 matmuls too (dY quantized by rows and by
    columns in one op; W's ternary codes as they are; grad_weight from X's codes as the forward quantized them).
    `int8_backward=False` runs them in the compute dtype, as BitNet b1.58's method does. On TinyLlama's shape (one
    H200) bitnet trains at 1.13-1.16x BF16 with it and 0.97-1.01x without; the 124M run's validation loss was +0.87%
    over BF16's in the same call (round 23) and +1.09% in round 12, where the high-precision backward gave
    +0.79-1.00% (docs/benchmarks.md).

    `grad_weight_token_blocks` (with `int8_backward`): grad_weight's dY quantized with a scale per output feature per
    128 tokens instead of one over all tokens (`qt.linear.MatmulPlan.k_block_scales`). On the CPU probe of 16,384
    tokens of a small Llama, grad_weight's SQNR against BF16's straight-through gradient rose from 37.6 to 48.0 dB
    on average (q/k projections: from 27.6-34.5 to 39.4-45.7 dB; docs/probes/). Off by default: on an H200 its
    matmul runs at 0.39-0.45x the plain INT8 matmul (0.68-0.73x cuBLAS BF16; docs/kernels.md, round 23), and the
    124M run's validation loss did not improve (3.4758 against 3.4646 without it, in the same call)."""

    name = "bitnet"
    ternary_all_gather: bool = False
    int8_backward: bool = True
    grad_weight_token_blocks: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.grad_weight_token_blocks and not self.int8_backward:
            raise ValueError("recipe 'bitnet' option grad_weight_token_blocks=True scales grad_weight's INT8 operand: "
                             "it needs int8_backward=True (with int8_backward=False the backward runs in high "
                             "precision)")

    def quantize_weight(self, weight: Tensor) -> Tensor:
        return BitNetWeight(weight, self)

    @property
    def plan(self) -> LinearPlan:
        if self.grad_weight_token_blocks:
            return BITNET_INT8_BACKWARD_TOKEN_BLOCKS_PLAN
        return BITNET_INT8_BACKWARD_PLAN if self.int8_backward else BITNET_PLAN


def ternarize(weight: Tensor, abs_mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns (INT8 ternary weight, FP32 tensor-wise scale). `abs_mean` lets a sharded weight use
    the mean over all shards."""
    if abs_mean is None:
        abs_mean = weight.abs().mean(dtype=torch.float32)
    scale = abs_mean.clamp(min=_MIN_WEIGHT_SCALE)
    ternary = (weight.float() / scale).round_().clamp_(-1, 1).to(torch.int8)
    return ternary, scale


class BitNetWeight(QuantizedWeight):
    """The latent high-precision weight; every forward ternarizes it afresh."""

    _inner_names = ("latent",)

    @staticmethod
    @torch._dynamo.disable
    def __new__(cls, latent: Tensor, config: BitNetConfig | None = None):
        return QuantizedWeight._wrapper(cls, latent, latent.dtype)

    @torch._dynamo.disable
    def __init__(self, latent: Tensor, config: BitNetConfig | None = None):
        self.latent = latent
        self.config = config or BitNetConfig()  # None: a weight saved before the config had options

    def _metadata(self):
        return (self.config,)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.latent if dtype is None else self.latent.to(dtype)

    def _update_(self, fn) -> None:
        fn(self.latent)

    def _in_place_target(self) -> Tensor:
        return self.latent

    def _to(self, device, dtype):
        return BitNetWeight(self.latent.to(device=device, dtype=dtype), self.config)

    def _new_zeros(self, size, device):
        return BitNetWeight(self.latent.new_zeros(size, device=device), self.config)

    def _forward_operands(self, dtype: torch.dtype, plan: LinearPlan):
        return _ternary_operands(*ternarize(self.latent))

    _grad_input_operand = staticmethod(lambda saved, dtype, plan: _ternary_grad_input_operand(*saved, dtype, plan))

    # FSDP2: all-gather the latent shard (in FSDP's param dtype when it has one); or, with `ternary_all_gather`,
    # ternarize the shard with the scale of the whole weight (the sum of |W| over the shards, see
    # qt.subclass.prepare_all_gathers) and all-gather it packed four values to a byte.
    @property
    def gathers_quantized(self) -> bool:
        return self.config.ternary_all_gather

    def _gather_statistic_source(self):
        return (self.latent, "abs_sum") if self.gathers_quantized else None

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        dtype = mp_policy.param_dtype or self.latent.dtype
        if not self.gathers_quantized:
            return (self.latent.to(dtype),), None
        return self.quantized_gather_inputs(dtype, outer_size, mesh)

    def _quantized_gather_inputs(self, dtype, outer_size, mesh):
        abs_sum = self.whole_weight_statistic(mesh.get_group())
        ternary, w_scale = ternarize(self.latent, abs_sum / outer_size.numel())
        return (pack_ternary(ternary),), (w_scale, self.latent.shape[1])

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        if not self.gathers_quantized:
            (latent,) = outputs
            if out is not None:  # FSDP re-filled the storage of `out.latent` in place
                return None
            return BitNetWeight(latent, self.config), (latent,)
        (packed,) = outputs
        w_scale, in_features = metadata
        w_scale = keep_for_current_stream(w_scale)
        ternary = unpack_ternary(packed, in_features)
        if out is not None:
            # The backward saved `out.ternary`; FSDP re-gathers into it before the backward runs,
            # so the refill must not look like a modification to autograd.
            with torch.autograd._unsafe_preserve_version_counter(out.ternary):
                out.ternary.copy_(ternary)
            with torch.autograd._unsafe_preserve_version_counter(out.w_scale):
                out.w_scale.copy_(w_scale)
            return None
        return BitNetTernaryWeight(ternary, w_scale, param_dtype, self.config), (ternary,)


class BitNetTernaryWeight(QuantizedWeight):
    """An already-ternarized weight: what FSDP2 un-shards a `BitNetWeight` into. Its gradient is the
    straight-through gradient that FSDP2 reduce-scatters back to the latent shards."""

    _inner_names = ("ternary", "w_scale")

    @staticmethod
    @torch._dynamo.disable
    def __new__(cls, ternary: Tensor, w_scale: Tensor, dtype: torch.dtype, config: BitNetConfig):
        return QuantizedWeight._wrapper(cls, ternary, dtype)

    @torch._dynamo.disable
    def __init__(self, ternary: Tensor, w_scale: Tensor, dtype: torch.dtype, config: BitNetConfig):
        self.ternary = ternary
        self.w_scale = w_scale
        self.config = config

    def _metadata(self):
        return (self.dtype, self.config)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return _dequantize_ternary(self.ternary, self.w_scale, dtype or self.dtype)

    def _update_(self, fn) -> None:
        raise RuntimeError("an un-sharded BitNet weight is rebuilt every all-gather; update the sharded latent weight")

    def _to(self, device, dtype):
        return BitNetTernaryWeight(self.ternary.to(device=device), self.w_scale.to(device=device), dtype or self.dtype,
                                   self.config)

    def _new_zeros(self, size, device):
        raise RuntimeError("an un-sharded BitNet weight cannot be re-sharded; shard the latent weight")

    def _forward_operands(self, dtype: torch.dtype, plan: LinearPlan):
        return _ternary_operands(self.ternary, self.w_scale)

    _grad_input_operand = BitNetWeight._grad_input_operand


def _ternary_operands(ternary: Tensor, w_scale: Tensor):
    """The forward's INT8 right operand ([in, out], in contiguous) and what the backward keeps."""
    return Int8Operand(ternary.T, w_scale), (ternary, w_scale)


def _dequantize_ternary(ternary: Tensor, w_scale: Tensor, dtype: torch.dtype) -> Tensor:
    return ternary.to(dtype) * w_scale.to(dtype)


def _ternary_grad_input_operand(ternary: Tensor, w_scale: Tensor, dtype: torch.dtype, plan: LinearPlan):
    """grad_input's right operand W [out, in]: in INT8 the ternary codes themselves (exact), laid out with
    out_features (the dimension dY @ W reduces) contiguous; else W dequantized."""
    if plan.grad_input.int8:
        return Int8Operand(to_column_major(ternary), w_scale)
    return _dequantize_ternary(ternary, w_scale, dtype)


def pack_ternary(ternary: Tensor) -> Tensor:
    """[rows, cols] values in {-1, 0, 1} -> [rows, ceil(cols / 4)] uint8, 2 bits a value. Packing
    along columns keeps rows whole, so FSDP2's row-wise shards concatenate correctly."""
    rows, cols = ternary.shape
    padded = torch.nn.functional.pad(ternary + 1, (0, -cols % 4)).to(torch.uint8)
    fours = padded.view(rows, -1, 4)
    return fours[..., 0] | (fours[..., 1] << 2) | (fours[..., 2] << 4) | (fours[..., 3] << 6)


def unpack_ternary(packed: Tensor, cols: int) -> Tensor:
    # Python shifts, not a tensor of them: making one on the GPU copies it from the host, and FSDP2 unpacks
    # on the compute stream, so every unpack would wait for the GPU to catch up (a sync per weight).
    values = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)
    return (values.view(packed.shape[0], -1)[:, :cols].to(torch.int8) - 1).contiguous()


_LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# The key of a converted layer's first SubLN in a state dict: `model.layers.3.self_attn.q_proj.0.weight`.
_CONVERTED_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.q_proj\.0\.weight$")


def _save_only_rstd(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # The norm's per-token rstd is kept (4 bytes a token), so the backward recomputes the norm's output in one
    # pointwise pass over its input, with the forward's bits and without redoing the reduction.
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.rsqrt.default else CheckpointPolicy.PREFER_RECOMPUTE


_recompute_all_but_rstd = functools.partial(create_selective_checkpoint_contexts, _save_only_rstd)


class SubLNLinear(nn.Sequential):
    """BitNet's SubLN and the linear it feeds: `nn.Sequential(norm, linear)` with the same numbers and state dict,
    and less memory before a linear with a plain high-precision weight. That linear would save the norm's output
    for its grad_weight; here the backward recomputes it from the norm's input, which the decoder layer keeps
    anyway (its residual stream), and the saved rstd. Selective activation checkpointing does it: torch.compile's
    partitioner follows its tags, where by itself it keeps any tensor that a backward matmul reads.

    On TinyLlama-1.1B's shape on a GPU, the small-layer rule leaves the k/v projections (2048 -> 256) in BF16, and
    their SubLNs' outputs, 2 x 2048 BF16 values a token a layer, put bitnet's peak memory above BF16's. A BitNet
    linear saves its input's INT8 rows instead, so its SubLN's output is not kept in any case."""

    def forward(self, x: Tensor) -> Tensor:
        norm, linear = self
        if torch.is_grad_enabled() and type(linear.weight) in (nn.Parameter, Tensor):
            return linear(checkpoint(norm, x, use_reentrant=False, context_fn=_recompute_all_but_rstd))
        return linear(norm(x))


def convert_llama_to_bitnet(model: nn.Module, layers: str | Iterable[int] = "quantized") -> nn.Module:
    """BitNet model surgery for a Hugging Face `LlamaForCausalLM` (or `LlamaModel`), in place, on the decoder
    layers that run BitNet: each of their linears becomes `SubLNLinear(RMSNorm, linear)` (BitNet's SubLN; an
    `nn.Sequential`), and their `input_layernorm` / `post_attention_layernorm` become identities. Returns the model.

    `layers="quantized"` (the default) converts the layers with at least one linear holding a BitNet weight, so
    call it after `quantize_(model, "bitnet")`: a layer whose linears all stayed in high precision (on a GPU,
    quantize_ leaves linears too small for the recipe in BF16) is no BitNet layer and stays a plain Llama layer,
    its two norms and no SubLN. A model quantize_ has not seen raises a ValueError. `layers="all"` converts every
    layer whatever its linears hold (e.g. for another library's BitNet linears), and a collection of layer
    indices converts those: `converted_layers(state_dict)` gives the layers of a saved converted model, to
    rebuild its structure before loading the state dict."""
    decoder_layers = _llama_layers(model)
    if any(isinstance(layer.self_attn.q_proj, nn.Sequential) for layer in decoder_layers):
        raise ValueError("this model has already been converted for BitNet")
    if layers == "quantized":
        linears = [[layer.get_submodule(path) for path in _LLAMA_LINEARS] for layer in decoder_layers]
        if not any(_seen_by_quantize(linear) for layer_linears in linears for linear in layer_linears):
            raise ValueError("convert_llama_to_bitnet converts the layers that quantize_ made BitNet: call "
                             "qt.quantize_(model, \"bitnet\") first, then this (or pass layers=\"all\" to convert "
                             "every layer whatever its linears hold)")
        chosen = {i for i, layer_linears in enumerate(linears) if any(map(_holds_bitnet_weight, layer_linears))}
    elif layers == "all":
        chosen = set(range(len(decoder_layers)))
    elif isinstance(layers, str):
        raise ValueError(f"layers={layers!r}: pass \"quantized\", \"all\" or the indices of the layers to convert")
    else:
        chosen = set(layers)
        if not chosen <= set(range(len(decoder_layers))):
            raise ValueError(f"layers: the model has decoder layers 0 to {len(decoder_layers) - 1}, not "
                             f"{sorted(chosen - set(range(len(decoder_layers))))}")
    eps = getattr(getattr(model, "config", None), "rms_norm_eps", 1e-6)
    for index in sorted(chosen):
        _convert_layer(decoder_layers[index], eps)
    return model


def converted_layers(state_dict: Mapping[str, object]) -> list[int]:
    """The indices of the decoder layers that `convert_llama_to_bitnet` converted in the model that `state_dict`
    (its keys) comes from: `convert_llama_to_bitnet(fresh_model, layers=converted_layers(state_dict))` gives a
    fresh model that structure."""
    return sorted({int(match[1]) for key in state_dict if (match := _CONVERTED_LAYER_KEY.search(key))})


def _llama_layers(model: nn.Module) -> nn.ModuleList:
    decoder = getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(_is_llama_layer(layer) for layer in layers):
        raise ValueError(
            f"convert_llama_to_bitnet supports Hugging Face LlamaForCausalLM / LlamaModel "
            f"(decoder layers with q/k/v/o_proj, gate/up/down_proj and two RMSNorms); got {type(model).__name__}"
        )
    return layers


def _convert_layer(layer: nn.Module, eps: float) -> None:
    norm_cls = type(layer.input_layernorm)
    for path in _LLAMA_LINEARS:
        parent_name, name = path.split(".")
        parent = getattr(layer, parent_name)
        linear = getattr(parent, name)
        norm = norm_cls(linear.in_features, eps=eps).to(device=linear.weight.device, dtype=linear.weight.dtype)
        setattr(parent, name, SubLNLinear(norm, linear))
    layer.input_layernorm = nn.Identity()
    layer.post_attention_layernorm = nn.Identity()


def _holds_bitnet_weight(linear: nn.Linear) -> bool:
    return isinstance(linear.weight, (BitNetWeight, BitNetTernaryWeight))


def _seen_by_quantize(linear: nn.Linear) -> bool:
    """Whether quantize_ has decided about `linear`: quantized it, or recorded why it left it."""
    return isinstance(linear.weight, QuantizedWeight) or hasattr(linear, "qt_unquantized_reason")


def _is_llama_layer(layer: nn.Module) -> bool:
    try:
        linears = [layer.get_submodule(path) for path in _LLAMA_LINEARS]
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
    except AttributeError:
        return False
    return all(isinstance(m, (nn.Linear, nn.Sequential)) for m in linears) and all(
        isinstance(n, nn.Module) for n in norms
    )
