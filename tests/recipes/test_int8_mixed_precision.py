"""INT8 mixed precision against float64 references of its math and of the unquantized linear."""

import pytest

import qt
from tests.recipes.linear_harness import SHAPES, assert_same_math, identity, make_case, reference, run_linear
from tests.reference import fake_quant_int8, sqnr_db


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("flags", [(True, True, True), (True, False, True), (False, True, False)])
def test_int8_mixed_precision_matches_reference(shape, bias, flags):
    output, grad_input, grad_weight = flags
    linear, x, dy = make_case(shape, bias)
    w, b = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    qt.quantize_(linear, "int8_mixed_precision", output=output, grad_input=grad_input, grad_weight=grad_weight,
                 filter_fn=lambda m, n: True)
    got = run_linear(linear, x, dy)
    out, gx, gw, _ = got

    def q(axis, on):
        return (lambda t: fake_quant_int8(t.float(), axis)) if on else identity

    assert_same_math(got, reference(w, b, x, dy, q(1, output), q(1, output), q(1, grad_input), q(0, grad_input),
                                    q(0, grad_weight), q(0, grad_weight)), dy)

    # INT8 with abs-max scales on Gaussian data: ~40 dB per operand; 30 dB leaves margin for two operands.
    plain_out, plain_gx, plain_gw = reference(w, b, x, dy, *[identity] * 6)
    assert sqnr_db(out, plain_out) > 30
    assert sqnr_db(gx, plain_gx) > 30
    assert sqnr_db(gw, plain_gw) > 30
