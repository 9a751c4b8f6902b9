"""Each recipe's forward, input grad and weight grad against a float64 reference of the same math,
and against the unquantized linear where quantization noise is expected."""

import pytest
import torch
from torch import nn

import qt
from tests.reference import fake_quant_int8, rel_err, sqnr_db, ternary_fake_quant

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


def identity(t):
    return t.double()


SHAPES = [(5,), (3, 7)]  # 2-D and 3-D inputs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("flags", [(True, True, True), (True, False, True), (False, True, False)])
def test_int8_mixed_precision_matches_reference(shape, bias, flags):
    output, grad_input, grad_weight = flags
    linear, x, dy = make_case(shape, bias)
    w, b = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    qt.quantize_(linear, "int8_mixed_precision", output=output, grad_input=grad_input, grad_weight=grad_weight,
                 filter_fn=lambda m, n: True)
    out, gx, gw, gb = run_linear(linear, x, dy)

    def q(axis, on):
        return (lambda t: fake_quant_int8(t.float(), axis)) if on else identity

    ref_out, ref_gx, ref_gw = reference(w, b, x, dy, q(1, output), q(1, output), q(1, grad_input), q(0, grad_input),
                                        q(0, grad_weight), q(0, grad_weight))
    assert rel_err(out, ref_out) < SAME_MATH_TOL
    assert rel_err(gx, ref_gx) < SAME_MATH_TOL
    assert rel_err(gw, ref_gw) < SAME_MATH_TOL
    if bias:
        assert rel_err(gb, dy.reshape(-1, dy.shape[-1]).sum(0)) < SAME_MATH_TOL

    # INT8 with abs-max scales on Gaussian data: ~40 dB per operand; 30 dB leaves margin for two operands.
    plain_out, plain_gx, plain_gw = reference(w, b, x, dy, *[identity] * 6)
    assert sqnr_db(out, plain_out) > 30
    assert sqnr_db(gx, plain_gx) > 30
    assert sqnr_db(gw, plain_gw) > 30


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("int8_activations", [False, True])
def test_int8_weight_only_matches_reference(shape, bias, int8_activations):
    linear, x, dy = make_case(shape, bias)
    w, b = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    qt.quantize_(linear, "int8_weight_only", int8_activations=int8_activations, filter_fn=lambda m, n: True)
    w_q = linear.weight.dequantize()
    assert rel_err(w_q, fake_quant_int8(w, 1)) < SAME_MATH_TOL  # stored weight = RTN quantization
    out, gx, gw, gb = run_linear(linear, x, dy)

    forward_x = (lambda t: fake_quant_int8(t.float(), 1)) if int8_activations else identity
    ref_out, ref_gx, ref_gw = reference(w_q, b, x, dy, forward_x, identity, identity, identity, identity, identity)
    assert rel_err(out, ref_out) < SAME_MATH_TOL
    assert rel_err(gx, ref_gx) < SAME_MATH_TOL
    assert rel_err(gw, ref_gw) < SAME_MATH_TOL
    plain_out, _, _ = reference(w, b, x, dy, *[identity] * 6)
    assert sqnr_db(out, plain_out) > 30


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bitnet_matches_reference(shape, bias):
    linear, x, dy = make_case(shape, bias)
    w, b = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    qt.quantize_(linear, "bitnet", filter_fn=lambda m, n: True)
    out, gx, gw, gb = run_linear(linear, x, dy)

    def x_q(t):
        return fake_quant_int8(t.float(), 1)

    # Straight-through estimator: the gradients use the quantized operands the forward used.
    ref_out, ref_gx, ref_gw = reference(w, b, x, dy, x_q, ternary_fake_quant, identity, ternary_fake_quant,
                                        identity, x_q)
    assert rel_err(out, ref_out) < SAME_MATH_TOL
    assert rel_err(gx, ref_gx) < SAME_MATH_TOL
    assert rel_err(gw, ref_gw) < SAME_MATH_TOL


@pytest.mark.parametrize("recipe", list(qt.RECIPES))
def test_bf16_autocast_is_close_to_fp32(recipe):
    """Under bf16 autocast the recipes compute in bf16: same math up to bf16 rounding."""
    linear, x, dy = make_case((4, 9), True)
    qt.quantize_(linear, recipe, filter_fn=lambda m, n: True)
    out32, gx32, gw32, _ = run_linear(linear, x, dy)
    linear.weight.grad = None
    linear.bias.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, gx16, gw16, _ = run_linear(linear, x, dy)
    assert out16.dtype == torch.bfloat16
    # bf16 has an 8-bit mantissa: per-element error ~2^-9, a few of them compound in the matmuls
    # and a re-quantization of bf16-rounded activations can flip an INT8 code.
    for lo, hi in [(out16, out32), (gx16, gx32), (gw16, gw32)]:
        assert rel_err(lo, hi) < 3e-2
