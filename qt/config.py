"""The base of every recipe's config: a dataclass of options that also knows how to swap a weight."""

from __future__ import annotations

import dataclasses
import typing

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """Options of one recipe. Subclasses are frozen dataclasses whose fields are the recipe's
    options (all with defaults), and implement `quantize_weight`."""

    name: typing.ClassVar[str]

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # An option typed `X | None` takes None for "decided by the other options".
            expected, *none = typing.get_args(hints[field.name]) or (hints[field.name],)
            if value is None and none:
                continue
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, field.name, float(value))
            elif not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise TypeError(
                    f"recipe '{self.name}' option {field.name}={value!r} must be a {expected.__name__}"
                    + (" or None" if none else "")
                )

    @classmethod
    def from_kwargs(cls, **kwargs) -> "RecipeConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(
                f"recipe '{cls.name}' has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {', '.join(known) or '(none)'}"
            )
        return cls(**kwargs)

    def incompatibility(self, linear: nn.Linear) -> str | None:
        """Why this recipe cannot take `linear`, or None when it can."""
        weight = linear.weight
        if not weight.is_floating_point():
            return f"its weight is {weight.dtype}, not a floating-point tensor"
        if weight.is_cuda and torch.cuda.get_device_capability(weight.device) < (8, 0):
            return "INT8 tensor-core matmuls need a GPU of compute capability 8.0 (Ampere) or newer"
        return None

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Returns the recipe's tensor subclass holding `weight` (a detached 2-D tensor)."""
        raise NotImplementedError
