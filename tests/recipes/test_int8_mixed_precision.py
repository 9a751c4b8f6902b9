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

    grad_weight_dy, grad_weight_x = q(0, grad_weight), q(0, grad_weight)
    if output and grad_weight:
        # By default grad_weight takes X's row-wise codes from the forward, X's per-token scales s folded into dY
        # before its column-wise quantization: (Q(s * dY) / s).T @ (s * X's codes) = Q(s * dY).T @ X's codes.
        x_rows = x.reshape(-1, x.shape[-1])
        s = (x_rows.abs().amax(1, keepdim=True) / 127).double()
        grad_weight_dy, grad_weight_x = (lambda t: fake_quant_int8(s * t, 0) / s), q(1, True)
    assert_same_math(got, reference(w, b, x, dy, q(1, output), q(1, output), q(1, grad_input), q(0, grad_input),
                                    grad_weight_dy, grad_weight_x), dy)

    # INT8 with abs-max scales on Gaussian data: ~40 dB per operand; 30 dB leaves margin for two operands.
    plain_out, plain_gx, plain_gw = reference(w, b, x, dy, *[identity] * 6)
    assert sqnr_db(out, plain_out) > 30
    assert sqnr_db(gx, plain_gx) > 30
    assert sqnr_db(gw, plain_gw) > 30


def test_int8_all_gather_rebuilds_the_forwards_int8_weight_from_row_shards():
    """FSDP2's hooks on two row shards (no process group: row-wise scales need none) give the weight the unsharded
    forward would quantize, bit for bit; grad_input re-quantizes that INT8 weight column-wise."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    linear, x, dy = make_case((7,), bias=True)
    w, b = linear.weight.detach().clone(), linear.bias.detach().clone()
    config = qt.Int8MixedPrecisionConfig(int8_all_gather=True, grad_weight_sees_quantized_input=False)  # X by columns
    gathered = [torch.cat(parts) for parts in zip(*[
        qt.recipes.Int8MixedPrecisionWeight(rows, config).fsdp_pre_all_gather(None, w.shape, w.stride(), None,
                                                                           MixedPrecisionPolicy())[0]
        for rows in w.chunk(2)])]
    weight, _ = qt.recipes.Int8MixedPrecisionWeight(w, config).fsdp_post_all_gather(gathered, None, torch.float32)
    assert type(weight) is qt.recipes.GatheredWeight
    forward, _ = weight._forward_operands(torch.float32, config.plan)
    unsharded, _ = qt.recipes.Int8MixedPrecisionWeight(w, config)._forward_operands(torch.float32, config.plan)
    assert torch.equal(forward.q, unsharded.q) and torch.equal(forward.scale, unsharded.scale)

    linear.weight = torch.nn.Parameter(weight)
    got = run_linear(linear, x, dy)
    rows = lambda t: fake_quant_int8(t.float(), 1)  # noqa: E731
    cols = lambda t: fake_quant_int8(t.float(), 0)  # noqa: E731
    assert_same_math(got, reference(w, b, x, dy, rows, rows, rows, lambda t: cols(rows(t)), cols, cols), dy)


def test_int8_all_gather_needs_the_int8_forward():
    with pytest.raises(ValueError, match="int8_all_gather=True .* needs output=True"):
        qt.quantize_(make_case((3,), False)[0], "int8_mixed_precision", output=False, int8_all_gather=True,
                     filter_fn=lambda m, n: True)


@pytest.mark.parametrize(("options", "sees_codes"), [
    ({}, True), ({"grad_input": False}, True), ({"output": False}, False), ({"grad_weight": False}, False),
    ({"grad_weight_sees_quantized_input": False}, False),
    ({"grad_weight": False, "grad_weight_sees_quantized_input": True}, True),  # BitNet's straight-through estimator
])
def test_grad_weight_sees_the_forwards_codes_by_default_where_both_matmuls_are_int8(options, sees_codes):
    config = qt.resolve_recipe("int8_mixed_precision", **options)
    assert config.grad_weight_sees_quantized_input is sees_codes
    assert config.plan.grad_weight_sees_quantized_input is sees_codes


def test_grad_weight_sees_quantized_input_takes_a_bool_or_none():
    with pytest.raises(TypeError, match="grad_weight_sees_quantized_input='yes' must be a bool or None"):
        qt.resolve_recipe("int8_mixed_precision", grad_weight_sees_quantized_input="yes")
