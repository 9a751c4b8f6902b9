"""The recipes' weights behave like parameters: optimizers, state_dict, torch.save, .to(), clone."""

import copy
import io

import pytest
import torch
from torch import nn

import qt
from tests.reference import rel_err

OPTIMIZERS = {
    "AdamW": lambda p, **impl: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, **impl),
    "Adam": lambda p, **impl: torch.optim.Adam(p, lr=1e-2, **impl),
    "SGD": lambda p, **impl: torch.optim.SGD(p, lr=1e-1, momentum=0.9, weight_decay=0.1, **impl),
}
# torch's three implementations of each optimizer step: per tensor, foreach kernels, fused kernels.
IMPLEMENTATIONS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def quantized_linear(recipe, seed=0, **kwargs):
    torch.manual_seed(seed)
    return qt.quantize_(nn.Sequential(nn.Linear(64, 48)), recipe, filter_fn=lambda m, n: True, **kwargs)[0]


def plain_step(weight, optimizer_name, grad, implementation):
    """The optimizer's step on a plain copy of the weight's high-precision value."""
    param = nn.Parameter(weight.dequantize().detach().clone().float())
    param.grad = grad.clone()
    OPTIMIZERS[optimizer_name]([param], **IMPLEMENTATIONS[implementation]).step()
    return param.detach()


@pytest.mark.parametrize("recipe", list(qt.RECIPES))
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_optimizer_step_matches_plain_parameter(recipe, optimizer_name, implementation):
    linear = quantized_linear(recipe)
    before = linear.weight.dequantize().clone()
    grad = torch.randn(48, 64)
    expected = plain_step(linear.weight, optimizer_name, grad, implementation)
    linear.weight.grad = grad.clone()
    OPTIMIZERS[optimizer_name](linear.parameters(), **IMPLEMENTATIONS[implementation]).step()
    assert isinstance(linear.weight, qt.QuantizedWeight)
    after = linear.weight.dequantize()
    if recipe == "int8_weight_only":
        # Re-quantized: the error is within a quantization step of the exact update.
        step = linear.weight.scale
        assert ((after - expected).abs() <= step * 1.001).all()
        assert rel_err(after - before, expected - before) < 0.5
    else:
        torch.testing.assert_close(after, expected)


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_grouped_step_over_mixed_weights_equals_per_tensor_steps(implementation):
    """A foreach or fused step over a list mixing plain parameters and every recipe's weights gives each
    the same update as the per-tensor step (weights stored quantized: the same FP32 update, rounded once)."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(64, 48) for _ in qt.RECIPES])
        for layer, recipe in zip(model, qt.RECIPES):
            kwargs = {"stochastic_rounding": False} if recipe == "int8_weight_only" else {}
            qt.quantize_(layer, recipe, filter_fn=lambda m, n: True, **kwargs)
        return model

    grouped, reference = build(), build()
    torch.manual_seed(1)
    grads = [torch.randn_like(p.dequantize() if isinstance(p, qt.QuantizedWeight) else p)
             for p in grouped.parameters()]
    for model, impl in ((grouped, IMPLEMENTATIONS[implementation]), (reference, {"foreach": False})):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, **impl)
        for _ in range(3):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for (name, after), expected in zip(grouped.named_parameters(), reference.parameters()):
        if isinstance(after, qt.recipes.Int8WeightOnlyWeight):
            # The per-tensor Adam writes the weight once a step too (addcdiv_), so both round alike but
            # the FP32 updates differ in their last bits: at most one quantization step apart.
            assert ((after.dequantize() - expected.dequantize()).abs() <= after.scale * 1.001).all(), name
        else:
            got = after.dequantize() if isinstance(after, qt.QuantizedWeight) else after
            want = expected.dequantize() if isinstance(expected, qt.QuantizedWeight) else expected
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("recipe", list(qt.RECIPES))
def test_fused_step_with_found_inf_leaves_the_weight_alone(recipe):
    """GradScaler and the training loop skip a non-finite step on the device through found_inf."""
    linear = quantized_linear(recipe)
    before = [t.clone() for t in linear.weight._inner()]
    linear.weight.grad = torch.randn(48, 64)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, fused=True)
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, linear.weight._inner()))


def test_int8_weight_only_update_is_unbiased_with_stochastic_rounding():
    """An update of a tenth of a quantization step survives on average with stochastic rounding
    and is lost with round-to-nearest."""
    for stochastic, expect_moved in [(True, True), (False, False)]:
        linear = quantized_linear("int8_weight_only", stochastic_rounding=stochastic)
        weight = linear.weight
        initial = weight.clone()
        start = weight.dequantize().clone()
        delta = 0.1 * weight.scale.expand_as(start)
        trials = 200
        total = torch.zeros_like(start)
        for _ in range(trials):
            with torch.no_grad():
                weight.copy_(initial)
                weight.add_(delta)
            total += weight.dequantize() - start
        mean_move = total / trials
        if expect_moved:
            # Each trial moves by 0 or one step (p = 0.1): the mean over 200 trials has standard error
            # sqrt(0.1 * 0.9 / 200) ~ 0.021 steps; 5 standard errors on the tensor's mean is far looser.
            assert rel_err(mean_move.mean(), delta.mean()) < 0.05
            assert (mean_move - delta).abs().max() < 0.15 * weight.scale.max()
        else:
            # Round-to-nearest puts every code back where it was; only the rows' scales move a little
            # (the update changed their abs-max), which does not shift the weights on average.
            assert torch.equal(weight.int_data, initial.int_data)
            assert mean_move.mean().abs() < 0.05 * delta.mean()


@pytest.mark.parametrize("recipe", list(qt.RECIPES))
def test_state_dict_round_trip_through_torch_save(recipe):
    linear = quantized_linear(recipe)
    buffer = io.BytesIO()
    torch.save(linear.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    fresh = quantized_linear(recipe, seed=1)
    fresh.load_state_dict(state)
    assert type(fresh.weight) is type(linear.weight)
    assert torch.equal(fresh.weight.dequantize(), linear.weight.dequantize())
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), linear(x))


@pytest.mark.parametrize("recipe", list(qt.RECIPES))
def test_load_plain_state_dict_into_quantized_model(recipe):
    source = nn.Linear(64, 48)
    linear = quantized_linear(recipe, stochastic_rounding=False) if recipe == "int8_weight_only" else quantized_linear(recipe)
    linear.load_state_dict(source.state_dict())
    assert rel_err(linear.weight.dequantize(), source.weight) < 1e-2


@pytest.mark.parametrize("recipe", list(qt.RECIPES))
def test_to_clone_deepcopy_and_plain_ops(recipe):
    linear = quantized_linear(recipe)
    value = linear.weight.dequantize().clone()
    clone = linear.weight.clone()
    assert type(clone) is type(linear.weight) and torch.equal(clone.dequantize(), value)
    copied = copy.deepcopy(linear)
    assert type(copied.weight) is type(linear.weight) and torch.equal(copied.weight.dequantize(), value)
    linear.to(torch.bfloat16)
    assert type(linear.weight) is type(copied.weight) and linear.weight.dtype == torch.bfloat16
    assert rel_err(linear.weight.dequantize(), value) < 1e-2
    zeros = torch.zeros_like(copied.weight)
    assert type(zeros) is torch.Tensor and zeros.dtype == torch.float32 and not zeros.any()
    doubled = copied.weight * 2
    assert type(doubled) is torch.Tensor and torch.equal(doubled, value * 2)


@pytest.mark.parametrize("recipe", list(qt.RECIPES))
def test_row_slices_and_splits_are_views_of_the_weight(recipe):
    linear = quantized_linear(recipe)
    value = linear.weight.dequantize().clone()
    rows = linear.weight[5:9]
    assert type(rows) is type(linear.weight) and torch.equal(rows.dequantize(), value[5:9])
    pieces = linear.weight.split(20)
    assert [p.shape[0] for p in pieces] == [20, 20, 8]
    assert torch.equal(pieces[1].dequantize(), value[20:40])
    if recipe == "int8_weight_only":
        with pytest.raises(NotImplementedError, match="along dim 0"):
            linear.weight[:, 3:5]
    with torch.no_grad():
        rows.copy_(torch.zeros(4, 64))  # writes through to the weight
    assert not linear.weight.dequantize()[5:9].any()


@pytest.mark.parametrize("recipe", list(qt.RECIPES))
def test_fsdp_hook_signature_is_precomputed(recipe):
    """FSDP2 reads the all-gather hook's signature before every all-gather of every weight; the weight class
    hands it over ready-made (QuantizedWeight.__init_subclass__) instead of inspect building it each time."""
    import inspect
    weight = quantized_linear(recipe).weight
    hook = weight.fsdp_pre_all_gather
    assert hook.__signature__ is weight.fsdp_pre_all_gather.__signature__  # made once, not per all-gather
    assert inspect.signature(hook) is hook.__signature__  # what FSDP2 calls: returned as it is, not rebuilt
    assert list(inspect.signature(hook).parameters) == ["mesh", "outer_size", "outer_stride", "module", "mp_policy"]
