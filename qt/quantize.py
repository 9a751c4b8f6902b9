"""`quantize_`: swap the weights of a model's linears for a recipe's tensor subclass, in place."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import types
from typing import Callable

import torch
from torch import nn

from qt.config import RecipeConfig
from qt.kernels.quantize import quantize_inductor_options
from qt.recipes import RECIPES
from qt.subclass import QuantizedWeight

logger = logging.getLogger(__name__)

# Last name component of the output layer in common model families (HF LMs, timm, torchvision).
_HEAD_NAMES = {"lm_head", "head", "classifier", "fc", "output"}


@dataclasses.dataclass(frozen=True)
class MinShape:
    """The smallest linear a recipe quantizes by default: `in_features` (K, the dimension the forward
    matmul reduces) and `out_features` (N) both at least these."""

    in_features: int
    out_features: int

    def __post_init__(self):
        for name in ("in_features", "out_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TypeError(f"min_shape: {name} must be an integer >= 0, not {value!r}")

    def shortfall(self, linear: nn.Linear) -> str | None:
        """Which dimensions of `linear` fall below these (e.g. "K=768 < 1024"), or None when none does."""
        out_features, in_features = linear.weight.shape
        short = [f"{dim}={size} < {least}" for dim, size, least in
                 (("K", in_features, self.in_features), ("N", out_features, self.out_features)) if size < least]
        return ", ".join(short) or None


# Below these shapes a recipe's quantized linear costs more than it saves (its quantize passes read tokens x (K + N)
# elements and its launches cost the same at any size, its matmul saves in proportion to tokens x K x N), so by
# default (`min_shape="auto"`) `quantize_` leaves such a linear in the compute dtype. Measured on CUDA GPUs only
# (SMALL_LINEAR_DEVICES): on the CPU every linear is quantized, and so is every linear of a recipe without a row.
#
# Source: scripts/bench_small_layers.py on one H100 (docs/benchmarks.md, round 5; torch 2.11): the GPU time of one
# compiled linear's forward + backward against BF16's, at 16384 and 4096 tokens, K and N from 512 to 5632.
# - int8_mixed_precision, bitnet, fp8_mixed_precision: with K or N below 2048, 0.31-0.96x BF16 at every shape
#   measured (best: fp8 0.94x, bitnet 0.96x at 1024 x 4096); with both from 2048, 0.65-1.31x, and in
#   TinyLlama-1.1B (2048/5632-wide linears) the whole step runs at 0.95-1.17x. These shapes do not all win yet:
#   leaving every losing one in BF16 would leave int8_mixed_precision and bitnet quantizing nothing at
#   TinyLlama's size (only 4096 x 4096 won at 16384 tokens), a recipe silently training in BF16. So the rule
#   drops the sizes that lose at every shape, and the rest is the recipes' speed work.
# - int8_weight_only: 0.93-1.04x at every shape (it only upcasts its weight); 1024 keeps 768-wide models in BF16.
SMALL_LINEAR_MIN_SHAPE: dict[str, MinShape] = {
    "int8_mixed_precision": MinShape(in_features=2048, out_features=2048),
    "int8_weight_only": MinShape(in_features=1024, out_features=1024),
    "bitnet": MinShape(in_features=2048, out_features=2048),
    "fp8_mixed_precision": MinShape(in_features=2048, out_features=2048),
}
SMALL_LINEAR_DEVICES = ("cuda",)


def resolve_recipe(recipe: str | RecipeConfig, **kwargs) -> RecipeConfig:
    """A config from a recipe name plus options, or a config as given (then no options)."""
    if isinstance(recipe, RecipeConfig):
        if kwargs:
            raise TypeError(f"pass options inside the config, not as keywords: got {sorted(kwargs)}")
        return recipe
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[recipe].from_kwargs(**kwargs)


def quantize_(
    model: nn.Module,
    recipe: str | RecipeConfig,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    include_head: bool = False,
    min_shape: MinShape | tuple[int, int] | str | None = "auto",
    skip_incompatible: bool = False,
    **recipe_kwargs,
) -> nn.Module:
    """Replaces the weight of every matching `nn.Linear` in `model` with `recipe`'s tensor subclass.

    `recipe` is a name from `qt.RECIPES` (options as keywords) or a config instance.
    `filter_fn(module, name)` picks the linears; by default all of them except the output head
    (`get_output_embeddings()` / `get_classifier()`, or a module named like a head), which
    `include_head=True` adds back, and except the linears too small for the recipe to be faster than
    the compute dtype: `min_shape="auto"` leaves a linear on a GPU in high precision when its
    in_features (K) or out_features (N) is below the recipe's `SMALL_LINEAR_MIN_SHAPE`;
    `min_shape=(K, N)` sets your own; `min_shape=None` quantizes every linear whatever its size. With
    a `filter_fn`, your filter decides alone unless you also pass `min_shape=(K, N)`.
    A linear the recipe cannot take raises a ValueError naming it, unless `skip_incompatible=True`,
    which logs the reason and leaves it alone. Each linear left alone records why
    (`quantization_summary` lists them). Returns `model`.
    """
    config = resolve_recipe(recipe, **recipe_kwargs)
    too_small_for_recipe = _size_rule(min_shape, config, by_default=filter_fn is None)
    heads = _head_modules(model)
    shared = _shared_weights(model)
    targets, left = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            left[module] = "excluded by filter_fn"
            continue
        if filter_fn is None and module in heads and not include_head:
            left[module] = "output head"
            continue
        too_small = too_small_for_recipe(module)
        if too_small:
            left[module] = f"too small for {config.name}: {too_small}"
            continue
        reason = _incompatibility(config, module, shared)
        if reason is None:
            targets.append(module)
        elif skip_incompatible:
            logger.warning("quantize_: skipping %s: %s", name, reason)
            left[module] = f"incompatible: {reason}"
        else:
            raise ValueError(
                f"quantize_ cannot apply '{config.name}' to linear '{name}': {reason}. "
                "Exclude it with filter_fn, or pass skip_incompatible=True to leave it unquantized."
            )
    # Swapped only once every linear passed its checks, so an error leaves the model as it was.
    for module, reason in left.items():
        if not isinstance(module.weight, QuantizedWeight):  # one quantized by an earlier call keeps its recipe
            module.qt_unquantized_reason = reason
    for module in targets:
        weight = module.weight
        module.weight = nn.Parameter(config.quantize_weight(weight.detach()), requires_grad=weight.requires_grad)
        module.qt_recipe = config
        module.__dict__.pop("qt_unquantized_reason", None)
        module.extra_repr = types.MethodType(_quantized_linear_repr, module)
        module._register_load_state_dict_pre_hook(functools.partial(_quantize_loaded_weight, config))
    return model


def inductor_options(model: nn.Module) -> dict:
    """The Inductor options to compile `model` with, `torch.compile(model, options=qt.inductor_options(model))` (the
    training loop compiles each block so): what qt's compiled quantizations want where `model` holds a recipe's
    weight (multi-kernel reductions, for the quantizations Inductor fuses into the ops producing their inputs:
    `qt.kernels.quantize.quantize_inductor_options`), else none."""
    holds_quantized_weight = any(isinstance(p, QuantizedWeight) for p in model.parameters())
    return quantize_inductor_options() if holds_quantized_weight else {}


def _size_rule(min_shape, config: RecipeConfig, by_default: bool) -> Callable[[nn.Linear], str | None]:
    """The size rule of `quantize_(min_shape=...)`: linear -> why it is too small, or None."""
    if min_shape == "auto":
        table = SMALL_LINEAR_MIN_SHAPE.get(config.name) if by_default else None
        if table is None:
            return lambda linear: None
        return lambda linear: (table.shortfall(linear) if linear.weight.device.type in SMALL_LINEAR_DEVICES
                               else None)
    if min_shape is None:
        return lambda linear: None
    if isinstance(min_shape, (tuple, list)) and len(min_shape) == 2:
        min_shape = MinShape(*min_shape)
    if not isinstance(min_shape, MinShape):
        raise TypeError(f"min_shape={min_shape!r}: pass \"auto\" (the recipe's measured thresholds), "
                        f"(in_features, out_features), or None (quantize every linear)")
    return min_shape.shortfall


def _quantize_loaded_weight(config: RecipeConfig, state_dict, prefix, *args) -> None:
    """A plain weight loaded into a quantized linear is stored the way `quantize_` stores it (rounding to
    nearest), not through the recipe's in-place update, which for int8_weight_only rounds stochastically."""
    key = prefix + "weight"
    if type(state_dict.get(key)) is torch.Tensor and state_dict[key].dim() == 2:
        state_dict[key] = config.quantize_weight(state_dict[key].detach())


def quantization_summary(model: nn.Module, max_listed: int = 6) -> str:
    """One line: how many of the model's linears run which recipe, and which stay in high precision and why.
    The linears left are grouped by reason and by name with layer numbers as `*`, so a deep model takes no
    more room than a shallow one."""
    heads = _head_modules(model)
    recipes: dict[str, int] = {}
    left: dict[str, dict[str | None, list[str]]] = {}  # reason -> its detail -> names
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, module in linears:
        if isinstance(module.weight, QuantizedWeight):
            recipe = getattr(module, "qt_recipe", None)
            key = recipe.name if recipe is not None else type(module.weight).__name__
            recipes[key] = recipes.get(key, 0) + 1
        else:
            # quantize_ records "reason" or "reason: detail"; a linear it never saw may still be a head.
            reason, _, detail = getattr(module, "qt_unquantized_reason",
                                        "output head" if module in heads else "not quantized").partition(": ")
            left.setdefault(reason, {}).setdefault(detail or None, []).append(name)
    quantized = ", ".join(f"{recipe} on {count}" for recipe, count in recipes.items()) or "no recipe"
    groups = []
    for reason, details in left.items():
        parts = []
        for detail, names in details.items():
            listed = names[0] if len(names) == 1 else f"{len(names)} x {_name_patterns(names, max_listed)}"
            parts.append(f"{listed} ({detail})" if detail else listed)
        groups.append(f"{reason}: {', '.join(parts)}")
    return f"{quantized} of {len(linears)} linears" + (f"; left in high precision: {'; '.join(groups)}" if groups else "")


def _name_patterns(names: list[str], max_listed: int) -> str:
    """Module names with their layer numbers as `*` where names differ only by them, each once, the prefix they
    share written once: `model.layers.*.mlp.{gate_proj, up_proj}`, but `model.layers.1.mlp.gate_proj` alone."""
    alike: dict[str, set[str]] = {}
    for name in names:
        alike.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name), set()).add(name)
    patterns = [(pattern if len(members) > 1 else min(members)).split(".") for pattern, members in alike.items()]
    shared = 0
    while len(patterns) > 1 and all(len(p) > shared + 1 and p[shared] == patterns[0][shared] for p in patterns):
        shared += 1
    tails = [".".join(p[shared:]) for p in patterns]
    listed = ", ".join(tails[:max_listed]) + (f", {len(tails) - max_listed} more" if len(tails) > max_listed else "")
    if len(tails) == 1:
        return listed
    return ".".join(patterns[0][:shared]) + ".{" + listed + "}" if shared else listed


def _quantized_linear_repr(linear: nn.Linear) -> str:
    """`print(model)` names each quantized linear's recipe and options."""
    return f"{nn.Linear.extra_repr(linear)}, recipe={linear.qt_recipe!r}"


def _incompatibility(config: RecipeConfig, linear: nn.Linear, shared: set[int]) -> str | None:
    if isinstance(linear.weight, QuantizedWeight):
        return f"its weight is already quantized ({type(linear.weight).__name__})"
    if id(linear.weight) in shared:
        return "its weight is shared with another module (tied embeddings?); quantizing it would untie them"
    return config.incompatibility(linear)


def _head_modules(model: nn.Module) -> set[nn.Module]:
    heads = {m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in _HEAD_NAMES}
    for getter in ("get_output_embeddings", "get_classifier"):
        if hasattr(model, getter):
            try:
                head = getattr(model, getter)()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(head, nn.Module):
                heads.add(head)
    return heads


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {pid for pid, count in owners.items() if count > 1}
