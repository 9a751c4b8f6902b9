"""The `quantize_` API: which linears it swaps, and its errors."""

import copy
import logging

import pytest
import torch
from torch import nn

import qt
from tests.tiny_models import tiny_llama


def quantized_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and isinstance(m.weight, qt.QuantizedWeight)}


def all_linears(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_recipes_registry_lists_the_recipes():
    assert set(qt.RECIPES) == {"int8_weight_only", "int8_mixed_precision", "fp8_mixed_precision", "bitnet"}
    assert qt.RECIPES["int8_mixed_precision"] is qt.Int8MixedPrecisionConfig
    assert qt.RECIPES["fp8_mixed_precision"] is qt.Fp8MixedPrecisionConfig


@pytest.mark.parametrize("recipe", list(qt.RECIPES))
def test_default_filter_skips_the_lm_head(recipe):
    model = tiny_llama()
    assert qt.quantize_(model, recipe) is model
    assert quantized_names(model) == all_linears(model) - {"lm_head"}
    assert len(quantized_names(model)) == 14  # 2 layers x (4 attention + 3 MLP)


def test_include_head_and_filter_fn():
    model = qt.quantize_(tiny_llama(), "int8_mixed_precision", include_head=True)
    assert quantized_names(model) == all_linears(model)
    model = qt.quantize_(tiny_llama(), "int8_mixed_precision", filter_fn=lambda m, name: "mlp" in name)
    assert quantized_names(model) == {n for n in all_linears(model) if "mlp" in n}


def test_options_by_keyword_and_by_config():
    model = qt.quantize_(tiny_llama(), "int8_mixed_precision", grad_weight=False)
    config = model.model.layers[0].mlp.up_proj.weight.config
    assert config == qt.Int8MixedPrecisionConfig(grad_weight=False)
    model = qt.quantize_(tiny_llama(), qt.Int8WeightOnlyConfig(stochastic_rounding=False))
    assert model.model.layers[0].mlp.up_proj.weight.config.stochastic_rounding is False


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe 'int4'; choose one of: int8_weight_only"):
        qt.quantize_(tiny_llama(), "int4")


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match="no option 'grad_wieght'; its options are: output, grad_input, grad_weight"):
        qt.quantize_(tiny_llama(), "int8_mixed_precision", grad_wieght=False)


def test_ill_typed_option():
    with pytest.raises(TypeError, match="stochastic_rounding='yes' must be a bool"):
        qt.quantize_(tiny_llama(), "int8_weight_only", stochastic_rounding="yes")


def test_config_and_keywords_together():
    with pytest.raises(TypeError, match="pass options inside the config"):
        qt.quantize_(tiny_llama(), qt.Int8WeightOnlyConfig(), stochastic_rounding=False)


def test_quantizing_twice_names_the_layer():
    model = qt.quantize_(tiny_llama(), "int8_weight_only")
    with pytest.raises(ValueError, match=r"linear 'model.layers.0.self_attn.q_proj': its weight is already quantized"):
        qt.quantize_(model, "int8_mixed_precision")


def test_tied_head_is_refused_or_skipped():
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="'lm_head': its weight is shared with another module"):
        qt.quantize_(model, "int8_weight_only", include_head=True)
    assert not quantized_names(model)  # an error leaves the model as it was


def test_skip_incompatible_logs_and_continues(caplog):
    model = tiny_llama(tie_word_embeddings=True)
    with caplog.at_level(logging.WARNING, logger="qt.quantize"):
        qt.quantize_(model, "int8_weight_only", include_head=True, skip_incompatible=True)
    assert "skipping lm_head" in caplog.text
    assert quantized_names(model) == all_linears(model) - {"lm_head"}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_non_float_weight_is_incompatible():
    linear = nn.Linear(8, 8)
    linear.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="its weight is torch.int8, not a floating-point tensor"):
        qt.quantize_(nn.Sequential(linear), "int8_weight_only")


def test_print_names_the_recipe_and_its_options():
    model = nn.Sequential(nn.Linear(8, 4))
    qt.quantize_(model, "int8_mixed_precision", filter_fn=lambda m, n: True, grad_weight=False)
    text = repr(model)
    assert "in_features=8, out_features=4" in text
    assert "recipe=Int8MixedPrecisionConfig(output=True, grad_input=True, grad_weight=False" in text


def test_loading_plain_weights_rounds_to_nearest_like_quantize():
    """Loading is deterministic: the INT8 codes are quantize_'s, whatever the RNG (not stochastic rounding)."""
    plain = nn.Sequential(nn.Linear(64, 48))
    expected = qt.quantize_(copy.deepcopy(plain), "int8_weight_only", filter_fn=lambda m, n: True)[0].weight
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = qt.quantize_(nn.Sequential(nn.Linear(64, 48)), "int8_weight_only", filter_fn=lambda m, n: True)
        model.load_state_dict(plain.state_dict())
        assert torch.equal(model[0].weight.int_data, expected.int_data)
        assert torch.equal(model[0].weight.scale, expected.scale)


def test_summary_names_the_recipe_and_what_stayed_in_high_precision():
    model = tiny_llama()
    qt.quantize_(model, "int8_mixed_precision")
    summary = qt.quantization_summary(model)
    n_linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert summary == (f"int8_mixed_precision on {n_linears - 1} of {n_linears} linears; "
                       "left in high precision: lm_head (output head)")
