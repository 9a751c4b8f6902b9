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
    qt.quantize_(model, "bitnet")
    qt.convert_llama_to_bitnet(model)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.Identity)
    assert isinstance(layer.post_attention_layernorm, torch.nn.Identity)
    for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
        assert isinstance(proj, torch.nn.Sequential) and type(proj[0]).__name__ == "LlamaRMSNorm"
        assert isinstance(proj[1], torch.nn.Linear)
    assert isinstance(layer.mlp.down_proj[1].weight, qt.QuantizedWeight)
    assert not isinstance(model.lm_head.weight, qt.QuantizedWeight)
    assert torch.isfinite(model(input_ids=tokens).logits).all()
    with pytest.raises(ValueError, match="already been converted"):
        qt.convert_llama_to_bitnet(model)


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def is_converted(layer) -> bool:
    """A BitNet layer: a SubLN before each of its linears and no layer norms; a plain one: neither."""
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    subln = [isinstance(layer.get_submodule(path), torch.nn.Sequential) for path in LINEARS]
    if all(subln) and all(isinstance(norm, torch.nn.Identity) for norm in norms):
        return True
    assert not any(subln) and not any(isinstance(norm, torch.nn.Identity) for norm in norms)
    return False


def test_only_the_layers_with_a_bitnet_linear_are_converted_and_a_plain_one_computes_as_before():
    """Layer 0 has one BitNet linear (q_proj): all its linears get a SubLN. Layer 2 has none: it stays the
    plain Llama layer it was, computing the same bits."""
    import copy

    from tests.tiny_models import tiny_llama

    plain = tiny_llama(num_hidden_layers=3)
    model = copy.deepcopy(plain)
    qt.quantize_(model, "bitnet", filter_fn=lambda m, name: name in ("model.layers.0.self_attn.q_proj",
                                                                      "model.layers.1.mlp.down_proj"))
    qt.convert_llama_to_bitnet(model)
    assert [is_converted(layer) for layer in model.model.layers] == [True, True, False]
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj[1].weight, qt.QuantizedWeight)
    assert not isinstance(layer.self_attn.k_proj[1].weight, qt.QuantizedWeight)  # normed all the same
    assert qt.recipes.bitnet.converted_layers(model.state_dict()) == [0, 1]

    seen = {}
    model.model.layers[2].register_forward_hook(lambda m, args, kwargs, out: seen.update(args=args, kwargs=kwargs,
                                                                                        out=out), with_kwargs=True)
    model(input_ids=torch.randint(0, 128, (2, 8)))
    assert torch.equal(plain.model.layers[2](*seen["args"], **seen["kwargs"]), seen["out"])
    assert model.model.layers[2].state_dict().keys() == plain.model.layers[2].state_dict().keys()


def test_a_model_whose_linears_quantize_all_left_in_high_precision_stays_a_plain_llama():
    """The 124M Llama on a GPU: every linear below the small-layer rule, so no layer gets BitNet's norms."""
    from tests.tiny_models import tiny_llama

    model, plain = tiny_llama(), tiny_llama()
    qt.quantize_(model, "bitnet", min_shape=(1024, 1024))
    qt.convert_llama_to_bitnet(model)
    assert [is_converted(layer) for layer in model.model.layers] == [False, False]
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_convert_llama_to_bitnet_before_quantize_is_refused_unless_every_layer_is_asked_for():
    from tests.tiny_models import tiny_llama

    model = tiny_llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r'qt.quantize_\(model, "bitnet"\) first, then this \(or pass layers="all"'):
        qt.convert_llama_to_bitnet(model)
    assert not any(is_converted(layer) for layer in model.model.layers)  # left as it was
    qt.convert_llama_to_bitnet(model, layers="all")
    assert all(is_converted(layer) for layer in model.model.layers)
    assert qt.recipes.bitnet.converted_layers(model.state_dict()) == [0, 1, 2]


def test_convert_llama_to_bitnet_takes_layer_indices_such_as_those_of_a_saved_model():
    from tests.tiny_models import tiny_llama

    model = tiny_llama(num_hidden_layers=3)
    qt.convert_llama_to_bitnet(model, layers=[2, 0])
    assert [is_converted(layer) for layer in model.model.layers] == [True, False, True]
    fresh = tiny_llama(num_hidden_layers=3)
    qt.convert_llama_to_bitnet(fresh, layers=qt.recipes.bitnet.converted_layers(model.state_dict()))
    fresh.load_state_dict(model.state_dict())  # strict: the same structure
    with pytest.raises(ValueError, match=r"decoder layers 0 to 2, not \[3\]"):
        qt.convert_llama_to_bitnet(tiny_llama(num_hidden_layers=3), layers=[1, 3])
    with pytest.raises(ValueError, match=r"layers='some': pass \"quantized\", \"all\" or the indices"):
        qt.convert_llama_to_bitnet(tiny_llama(), layers="some")


def test_convert_llama_to_bitnet_refuses_other_models():
    with pytest.raises(ValueError, match="supports Hugging Face LlamaForCausalLM.*got Sequential"):
        qt.convert_llama_to_bitnet(torch.nn.Sequential(torch.nn.Linear(4, 4)))
