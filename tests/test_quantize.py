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
                       "left in high precision: output head: lm_head")


# The small-layer rule. Its thresholds are measured for GPUs (on the CPU every linear is quantized): these
# tests apply it to CPU weights as it applies to CUDA ones.
@pytest.fixture
def size_rule_on_cpu(monkeypatch):
    monkeypatch.setattr(qt.quantize, "SMALL_LINEAR_DEVICES", ("cpu",))


def linears_around(least: qt.MinShape) -> nn.ModuleDict:
    """Linears at and just below a MinShape on each dimension (2 x 2 features where the threshold is 0)."""
    k, n = max(least.in_features, 2), max(least.out_features, 2)
    return nn.ModuleDict({"at": nn.Linear(k, n), "k_below": nn.Linear(k - 1, n), "n_below": nn.Linear(k, n - 1),
                          "both_below": nn.Linear(k - 1, n - 1)})


@pytest.mark.parametrize("recipe", list(qt.RECIPES))
def test_by_default_a_linear_below_the_recipes_min_shape_on_either_dimension_stays_in_high_precision(
        recipe, size_rule_on_cpu):
    least = qt.SMALL_LINEAR_MIN_SHAPE[recipe]
    model = qt.quantize_(linears_around(least), recipe)
    assert quantized_names(model) == {"at"}
    k, n = least.in_features, least.out_features
    assert model["k_below"].qt_unquantized_reason == f"too small for {recipe}: K={k - 1} < {k}"
    assert model["n_below"].qt_unquantized_reason == f"too small for {recipe}: N={n - 1} < {n}"
    assert model["both_below"].qt_unquantized_reason == f"too small for {recipe}: K={k - 1} < {k}, N={n - 1} < {n}"


def test_every_recipe_has_measured_thresholds():
    """A new recipe (FP8...) must come with its row, measured by scripts/bench_small_layers.py."""
    assert set(qt.RECIPES) <= set(qt.SMALL_LINEAR_MIN_SHAPE)


def test_on_the_cpu_the_rule_is_not_applied():
    model = qt.quantize_(linears_around(qt.MinShape(1024, 1024)), "int8_mixed_precision")
    assert quantized_names(model) == set(model.keys())


def test_min_shape_none_quantizes_every_linear_and_a_min_shape_of_your_own_applies_anywhere(size_rule_on_cpu):
    model = qt.quantize_(linears_around(qt.MinShape(1024, 1024)), "int8_weight_only", min_shape=None)
    assert quantized_names(model) == set(model.keys())
    model = qt.quantize_(linears_around(qt.MinShape(64, 32)), "int8_weight_only", min_shape=(64, 32))
    assert quantized_names(model) == {"at"}
    assert model["n_below"].qt_unquantized_reason == "too small for int8_weight_only: N=31 < 32"


def test_an_explicit_filter_fn_decides_alone_unless_min_shape_is_given(size_rule_on_cpu):
    model = qt.quantize_(linears_around(qt.MinShape(1024, 1024)), "bitnet", filter_fn=lambda m, name: True)
    assert quantized_names(model) == set(model.keys())
    model = qt.quantize_(linears_around(qt.MinShape(64, 32)), "bitnet", filter_fn=lambda m, name: name != "at",
                         min_shape=qt.MinShape(64, 0))
    assert quantized_names(model) == {"n_below"}
    assert model["at"].qt_unquantized_reason == "excluded by filter_fn"


@pytest.mark.parametrize("min_shape", [(1024,), (-1, 0), (1.5, 2), "small", qt.RECIPES])
def test_a_bad_min_shape_says_what_to_pass(min_shape):
    with pytest.raises(TypeError, match="min_shape"):
        qt.quantize_(tiny_llama(), "int8_mixed_precision", min_shape=min_shape)


def test_the_summary_groups_the_layers_left_by_reason_and_name_whatever_the_depth(size_rule_on_cpu):
    summaries = []
    for layers in (2, 8):
        model = qt.quantize_(tiny_llama(num_hidden_layers=layers), "int8_mixed_precision", min_shape=(128, 0))
        summaries.append(qt.quantization_summary(model))
    assert summaries == [
        f"int8_mixed_precision on {layers} of {7 * layers + 1} linears; left in high precision: too small for "
        f"int8_mixed_precision: {6 * layers} x model.layers.*.{{self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, "
        f"self_attn.o_proj, mlp.gate_proj, mlp.up_proj}} (K=64 < 128); output head: lm_head" for layers in (2, 8)]


def test_the_summary_lists_names_past_the_limit_as_a_count_and_gives_each_reason():
    model = tiny_llama(tie_word_embeddings=True)
    qt.quantize_(model, "int8_weight_only", include_head=True, skip_incompatible=True,
                 filter_fn=lambda m, name: "mlp" not in name)
    assert qt.quantization_summary(model, max_listed=2) == (
        "int8_weight_only on 8 of 15 linears; left in high precision: excluded by filter_fn: "
        "6 x model.layers.*.mlp.{gate_proj, up_proj, 1 more}; incompatible: lm_head (its weight is shared with "
        "another module (tied embeddings?); quantizing it would untie them)")


def test_the_summary_keeps_the_layer_number_of_a_name_no_other_layer_shares():
    model = qt.quantize_(tiny_llama(num_hidden_layers=3), "int8_weight_only", include_head=True,
                         filter_fn=lambda m, name: not name.startswith("model.layers.1.") and "k_proj" not in name)
    assert qt.quantization_summary(model, max_listed=3) == (
        "int8_weight_only on 13 of 22 linears; left in high precision: excluded by filter_fn: 9 x model.layers.{"
        "*.self_attn.k_proj, 1.self_attn.q_proj, 1.self_attn.v_proj, 4 more}")


def test_a_layer_quantized_later_no_longer_reports_why_it_was_left(size_rule_on_cpu):
    model = qt.quantize_(linears_around(qt.MinShape(64, 32)), "int8_mixed_precision", min_shape=(64, 32))
    qt.quantize_(model, "int8_mixed_precision", filter_fn=lambda m, name: name != "at")
    assert quantized_names(model) == set(model.keys())
    assert qt.quantization_summary(model) == "int8_mixed_precision on 4 of 4 linears"


# qt.sqnr.forward_sqnr: the forward SQNR of a model's quantized linear against its unquantized twin.
def sqnr_model(recipe=None, **kwargs):
    """Linears of 64 x 96, 96 x 128 (the largest) and 128 x 48, in BF16."""
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 128), nn.Linear(128, 48)).to(torch.bfloat16)
    return qt.quantize_(model, recipe, filter_fn=lambda m, n: True, **kwargs) if recipe else model


def test_forward_sqnr_compares_the_largest_quantized_linear_with_its_float64_twin():
    from qt.sqnr import forward_sqnr, random_input, sqnr_db
    model = sqnr_model("int8_mixed_precision")
    result = forward_sqnr(model)
    linear = model[1]
    x = random_input(96, 256, torch.device("cpu"), torch.bfloat16)
    with torch.no_grad():
        twin = torch.nn.functional.linear(x.double(), linear.weight.master.double(), linear.bias.double())
        assert result == qt.sqnr.ForwardSQNR("1", sqnr_db(linear(x), twin), quantized=True)
    assert 30 < result.db < 45  # INT8 activations and weights, row-wise: ~40 dB on normal data
    assert str(result) == f"forward SQNR of 1 vs its unquantized twin: {result.db:.1f} dB"


@pytest.mark.parametrize("recipe, kwargs, low, high", [
    (None, {}, 50, 60),  # BF16 rounding alone: what a path that silently stopped quantizing shows
    ("int8_mixed_precision", {"output": False}, 50, 60),  # the forward in BF16: flagged too
    ("int8_mixed_precision", {"stochastic_rounding": True}, 30, 45),
    ("int8_weight_only", {}, 35, 48),
    ("int8_weight_only", {"int8_activations": True}, 30, 45),
    ("bitnet", {}, 0, 15)])
def test_forward_sqnr_per_recipe_is_below_the_not_quantized_line_only_when_the_forward_quantizes(
        recipe, kwargs, low, high):
    from qt.sqnr import NOT_QUANTIZED_DB, forward_sqnr
    model = sqnr_model(recipe, **kwargs)
    rng = torch.random.get_rng_state()
    result = forward_sqnr(model)
    assert torch.equal(torch.random.get_rng_state(), rng)  # stochastic rounding drew from a forked RNG
    assert low < result.db < high and (result.db >= NOT_QUANTIZED_DB) == (low >= NOT_QUANTIZED_DB)
    assert result.quantized == (recipe is not None) and result.layer == "1"
    # int8_weight_only keeps no high-precision weight to compare with: its recipe quantizes a random one.
    assert result.stand_in == (recipe == "int8_weight_only")


def test_forward_sqnr_of_a_model_without_linears_is_none():
    from qt.sqnr import forward_sqnr
    assert forward_sqnr(nn.Sequential(nn.ReLU())) is None
