"""A linear run forward and backward, and its float64 reference with any operand quantized."""

import torch
from torch import nn

from tests.reference import rel_err

# fp32 compute of the same math: only the fp32 epilogue and accumulation order differ from float64.
SAME_MATH_TOL = 1e-5


def run_linear(linear: nn.Linear, x: torch.Tensor, dy: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = linear(x)
    out.backward(dy)
    bias_grad = linear.bias.grad if linear.bias is not None else None
    return out.detach(), x.grad, linear.weight.grad, bias_grad


def make_case(shape, bias, seed=0, in_features=48, out_features=40):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(*shape, in_features)
    dy = torch.randn(*shape, out_features)
    return linear, x, dy


def reference(w, b, x, dy, forward_x, forward_w, grad_input_dy, grad_input_w, grad_weight_dy, grad_weight_x):
    """A linear in float64 where each matmul operand may be replaced by its quantized version."""
    x2, dy2 = x.reshape(-1, x.shape[-1]).double(), dy.reshape(-1, dy.shape[-1]).double()
    out = forward_x(x2) @ forward_w(w).T
    if b is not None:
        out = out + b.double()
    grad_x = grad_input_dy(dy2) @ grad_input_w(w)
    grad_w = grad_weight_dy(dy2).T @ grad_weight_x(x2)
    return out.view(*x.shape[:-1], -1), grad_x.view(x.shape), grad_w


def assert_same_math(got, expected, dy):
    """`got` (a `run_linear` result) equals the float64 reference `expected` (output, grad_input, grad_weight)
    up to float32 computation, and the bias gradient, where there is one, is dY summed over tokens."""
    out, grad_x, grad_w, grad_b = got
    for name, actual, reference_value in zip(("output", "grad_input", "grad_weight"), (out, grad_x, grad_w), expected):
        assert rel_err(actual, reference_value) < SAME_MATH_TOL, name
    if grad_b is not None:
        assert rel_err(grad_b, dy.reshape(-1, dy.shape[-1]).sum(0)) < SAME_MATH_TOL


def identity(t):
    return t.double()


SHAPES = [(5,), (3, 7)]  # 2-D and 3-D inputs


