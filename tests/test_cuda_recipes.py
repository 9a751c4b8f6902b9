"""The recipes on a GPU (skipped without one): the Triton kernels against the torch ops, and compiled
graphs that launch the Triton kernels themselves (no qt op, hence no Python, between kernels)."""

import pytest
import torch
from torch import nn

import qt
from tests.kernels.backends import through
from tests.reference import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RECIPES = [("int8_mixed_precision", {}), ("int8_mixed_precision", {"stochastic_rounding": True}),
           ("int8_weight_only", {}), ("int8_weight_only", {"int8_activations": True}), ("bitnet", {})]


def linear_case(recipe, kwargs, tokens=1000, in_features=768, out_features=640):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, device="cuda", dtype=torch.bfloat16)
    qt.quantize_(linear, recipe, filter_fn=lambda m, n: True, **kwargs)
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, out_features, device="cuda", dtype=torch.bfloat16)
    return linear, x, dy


def forward_backward(linear, x, dy):
    x = x.detach().clone().requires_grad_()
    linear.weight.grad = None
    out = linear(x)
    out.backward(dy)
    return out.detach(), x.grad, linear.weight.grad


@pytest.mark.parametrize(("recipe", "kwargs"), RECIPES)
def test_triton_kernels_match_torch_ops(recipe, kwargs):
    linear, x, dy = linear_case(recipe, kwargs)
    torch.manual_seed(1)
    triton = through("triton", forward_backward)(linear, x, dy)
    torch.manual_seed(1)
    reference = through("torch", forward_backward)(linear, x, dy)
    # Round-to-nearest: the same integers; the bf16 outputs may differ by the epilogue's last bit.
    # Stochastic rounding draws other random numbers on each path: only statistically equal.
    tolerance = 0.05 if kwargs.get("stochastic_rounding") else 1e-2
    for got, want in zip(triton, reference):
        assert rel_err(got, want) < tolerance


@pytest.mark.parametrize(("recipe", "kwargs"), [r for r in RECIPES if not r[1].get("stochastic_rounding")])
def test_compiled_graph_launches_the_kernels_directly(recipe, kwargs):
    from torch._inductor.utils import run_and_get_code

    linear, x, dy = linear_case(recipe, kwargs)
    eager = forward_backward(linear, x, dy)
    torch._dynamo.reset()
    compiled = torch.compile(linear, fullgraph=True)
    result, sources = run_and_get_code(forward_backward, compiled, x, dy)
    code = "\n".join(sources)
    assert "torch.ops.qt" not in code
    plan = linear.weight.plan
    if any(matmul.int8 for matmul in (plan.output, plan.grad_input, plan.grad_weight)):
        assert "_scaled_int8_mm_kernel" in code
    for got, want in zip(result, eager):
        assert rel_err(got, want) < 1e-2
