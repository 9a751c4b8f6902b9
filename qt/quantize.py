"""`quantize_`: swap the weights of a model's linears for a recipe's tensor subclass, in place."""

from __future__ import annotations

import functools
import logging
import types
from typing import Callable

import torch
from torch import nn

from qt.config import RecipeConfig
from qt.recipes import RECIPES
from qt.subclass import QuantizedWeight

logger = logging.getLogger(__name__)

# Last name component of the output layer in common model families (HF LMs, timm, torchvision).
_HEAD_NAMES = {"lm_head", "head", "classifier", "fc", "output"}


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
    skip_incompatible: bool = False,
    **recipe_kwargs,
) -> nn.Module:
    """Replaces the weight of every matching `nn.Linear` in `model` with `recipe`'s tensor subclass.

    `recipe` is a name from `qt.RECIPES` (options as keywords) or a config instance.
    `filter_fn(module, name)` picks the linears; by default all of them except the output head
    (`get_output_embeddings()` / `get_classifier()`, or a module named like a head), which
    `include_head=True` adds back. A linear the recipe cannot take raises a ValueError naming it,
    unless `skip_incompatible=True`, which logs the reason and leaves it alone. Returns `model`.
    """
    config = resolve_recipe(recipe, **recipe_kwargs)
    heads = _head_modules(model)
    shared = _shared_weights(model)
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if filter_fn is not None:
            if not filter_fn(module, name):
                continue
        elif module in heads and not include_head:
            continue
        reason = _incompatibility(config, module, shared)
        if reason is None:
            targets.append(module)
        elif skip_incompatible:
            logger.warning("quantize_: skipping %s: %s", name, reason)
        else:
            raise ValueError(
                f"quantize_ cannot apply '{config.name}' to linear '{name}': {reason}. "
                "Exclude it with filter_fn, or pass skip_incompatible=True to leave it unquantized."
            )
    # Swapped only once every linear passed its checks, so an error leaves the model as it was.
    for module in targets:
        weight = module.weight
        module.weight = nn.Parameter(config.quantize_weight(weight.detach()), requires_grad=weight.requires_grad)
        module.qt_recipe = config
        module.extra_repr = types.MethodType(_quantized_linear_repr, module)
        module._register_load_state_dict_pre_hook(functools.partial(_quantize_loaded_weight, config))
    return model


def _quantize_loaded_weight(config: RecipeConfig, state_dict, prefix, *args) -> None:
    """A plain weight loaded into a quantized linear is stored the way `quantize_` stores it (rounding to
    nearest), not through the recipe's in-place update, which for int8_weight_only rounds stochastically."""
    key = prefix + "weight"
    if type(state_dict.get(key)) is torch.Tensor and state_dict[key].dim() == 2:
        state_dict[key] = config.quantize_weight(state_dict[key].detach())


def quantization_summary(model: nn.Module, max_listed: int = 6) -> str:
    """One line: how many of the model's linears run which recipe, and which stay in high precision."""
    heads = _head_modules(model)
    recipes: dict[str, int] = {}
    left = []
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, module in linears:
        if isinstance(module.weight, QuantizedWeight):
            recipe = getattr(module, "qt_recipe", None)
            key = recipe.name if recipe is not None else type(module.weight).__name__
            recipes[key] = recipes.get(key, 0) + 1
        else:
            left.append(f"{name} (output head)" if module in heads else name)
    quantized = ", ".join(f"{recipe} on {count}" for recipe, count in recipes.items()) or "no recipe"
    listed = ", ".join(left[:max_listed]) + (f" and {len(left) - max_listed} more" if len(left) > max_listed else "")
    return (f"{quantized} of {len(linears)} linears"
            + (f"; left in high precision: {listed}" if left else ""))


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
