"""Non-finite activations come out non-finite through every INT8 path (the training loop's non-finite
stop relies on it): Triton's max ignores NaN, so the kernels must not quantize it into finite codes."""

import pytest
import torch

import qt
from tests.kernels.backends import through
from tests.recipes.linear_harness import make_case


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(("recipe", "kwargs"), [("int8_mixed_precision", {}), ("bitnet", {}),
                                                ("int8_weight_only", {"int8_activations": True})])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_token_gives_a_non_finite_output_row(backend, recipe, kwargs, bad):
    linear, x, _ = make_case((6,), bias=False)
    qt.quantize_(linear, recipe, filter_fn=lambda m, n: True, **kwargs)
    x[2, 5] = bad
    out = through(backend, linear)(x)
    assert not torch.isfinite(out[2]).all()
    assert torch.isfinite(out[[0, 1, 3, 4, 5]]).all()
