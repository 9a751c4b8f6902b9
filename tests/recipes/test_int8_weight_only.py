"""INT8 weight-only against float64 references of its math and of the unquantized linear."""

import pytest

import qt
from tests.recipes.linear_harness import SAME_MATH_TOL, SHAPES, identity, make_case, reference, run_linear
from tests.reference import fake_quant_int8, rel_err, sqnr_db


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
