"""BitNet b1.58 against a float64 reference of its math; packing; the Llama surgery."""

import pytest
import torch

import qt
from tests.recipes.linear_harness import SAME_MATH_TOL, SHAPES, identity, make_case, reference, run_linear
from tests.reference import fake_quant_int8, rel_err, ternary_fake_quant


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


def test_pack_unpack_ternary_round_trips_odd_widths():
    from qt.recipes.bitnet import pack_ternary, unpack_ternary

    ternary = torch.randint(-1, 2, (6, 13), dtype=torch.int8)
    packed = pack_ternary(ternary)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 4)
    assert torch.equal(unpack_ternary(packed, 13), ternary)


def test_convert_llama_to_bitnet_moves_the_norms():
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    tokens = torch.randint(0, 128, (2, 8))
    qt.convert_llama_to_bitnet(model)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.Identity)
    assert isinstance(layer.post_attention_layernorm, torch.nn.Identity)
    for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
        assert isinstance(proj, torch.nn.Sequential) and type(proj[0]).__name__ == "LlamaRMSNorm"
        assert isinstance(proj[1], torch.nn.Linear)
    qt.quantize_(model, "bitnet")
    assert isinstance(layer.mlp.down_proj[1].weight, qt.QuantizedWeight)
    assert not isinstance(model.lm_head.weight, qt.QuantizedWeight)
    assert torch.isfinite(model(input_ids=tokens).logits).all()
    with pytest.raises(ValueError, match="already been converted"):
        qt.convert_llama_to_bitnet(model)


def test_convert_llama_to_bitnet_refuses_other_models():
    with pytest.raises(ValueError, match="supports Hugging Face LlamaForCausalLM.*got Sequential"):
        qt.convert_llama_to_bitnet(torch.nn.Sequential(torch.nn.Linear(4, 4)))
