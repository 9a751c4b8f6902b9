"""Activation checkpointing recomputes the recipes' forward exactly: the gradients do not change."""

import pytest
import torch

import qt
from tests.tiny_models import tiny_llama


def grads(recipe, checkpointing, **recipe_kwargs):
    model = qt.quantize_(tiny_llama(), recipe, **recipe_kwargs)
    if recipe == "bitnet":
        qt.convert_llama_to_bitnet(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    forward_calls = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda *args: forward_calls.append(1))
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # the stochastic-rounding draws
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert len(forward_calls) == (2 if checkpointing else 1)  # the backward recomputed the layer
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    "recipe, kwargs",
    [("int8_weight_only", {}), ("int8_mixed_precision", {"stochastic_rounding": True}), ("bitnet", {}),
     ("fp8_mixed_precision", {})],
)
def test_checkpointed_gradients_equal_plain_ones(recipe, kwargs):
    # The recomputed forward must re-draw the same stochastic-rounding numbers (checkpoint restores
    # the RNG state), or the saved and recomputed activations would disagree.
    for plain, checkpointed in zip(grads(recipe, False, **kwargs), grads(recipe, True, **kwargs)):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
