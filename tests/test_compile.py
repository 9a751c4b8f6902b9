"""torch.compile gives the eager numbers for every recipe, with no graph break inside the linears.

One compiled model holds one linear of each recipe: a compile costs ~25 s on the CI's CPUs."""

import torch
from torch import nn

import qt


def build():
    torch.manual_seed(0)
    # bf16, as users train: Inductor pattern-matches bf16 matmuls with INT8 weights specially.
    model = nn.Sequential(nn.Linear(256, 128, bias=False), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32),
                          nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
    model.to(torch.bfloat16)
    recipes = {0: ("int8_weight_only", {}), 2: ("int8_mixed_precision", {}), 4: ("bitnet", {}),
               6: ("int8_mixed_precision", {"grad_weight_sees_quantized_input": False}),
               8: ("bitnet", {"int8_backward": False}),
               10: ("bitnet", {"grad_weight_token_blocks": True})}
    for index, (recipe, options) in recipes.items():
        qt.quantize_(model, recipe, **options, filter_fn=lambda m, name, index=index: name == str(index))
    return model


def loss_and_grads(model, forward, x):
    loss = forward(x).float().square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return loss.detach(), grads


def test_compiled_forward_and_backward_match_eager():
    model = build()
    # Every linear computes grad_input; 300 tokens make three blocks of grad_weight_token_blocks' scales.
    x = torch.randn(300, 256, dtype=torch.bfloat16, requires_grad=True)
    eager_loss, eager_grads = loss_and_grads(model, model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    saved = []
    # No compile cache: a graph cached before a change to the linears' backward would hide it.
    with torch._inductor.config.patch(force_disable_caches=True), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        compiled_loss, compiled_grads = loss_and_grads(model, compiled, x)
    # The partitioner keeps for the backward no dequantized copy of the INT8 weight-only weight (2 bytes an element
    # above its INT8 rows): the backward makes its own from the rows it saves.
    int8_rows = model[0].weight.int_data
    assert not [t for t in saved if t.shape == int8_rows.shape and t.is_floating_point()]
    assert any(t.untyped_storage().data_ptr() == int8_rows.untyped_storage().data_ptr() for t in saved)
    # Same quantization and the same INT8 matmuls; fusion may keep intermediates in fp32 where eager
    # rounds them to bf16 (2^-8 relative), which can also flip an INT8 code downstream.
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-2, atol=0)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        assert (compiled_grad.float() - eager_grad.float()).norm() < 2e-2 * eager_grad.float().norm()


def test_compiled_int8_weight_only_bf16_linear_alone():
    """A lone bias-free INT8 weight-only linear in bf16 meets Inductor's INT8 weight-only matmul
    pattern, which expects a 1-D scale (a [1, N] scale broke its lowering)."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False).to(torch.bfloat16)
    qt.quantize_(nn.Sequential(linear), "int8_weight_only", filter_fn=lambda m, n: True)
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(linear)(x), linear(x), rtol=1e-2, atol=1e-2)
