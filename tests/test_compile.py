"""torch.compile gives the eager numbers for every recipe, with no graph break inside the linears.

One compiled model holds one linear of each recipe: a compile costs ~25 s on the CI's CPUs."""

import torch
from torch import nn

import qt


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 24))
    for index, recipe in zip((0, 2, 4), ("int8_mixed_precision", "int8_weight_only", "bitnet")):
        qt.quantize_(model, recipe, filter_fn=lambda m, name, index=index: name == str(index))
    return model


def loss_and_grads(model, forward, x):
    loss = forward(x).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return loss.detach(), grads


def test_compiled_forward_and_backward_match_eager():
    model = build()
    x = torch.randn(2, 5, 32)
    eager_loss, eager_grads = loss_and_grads(model, model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    compiled_loss, compiled_grads = loss_and_grads(model, compiled, x)
    # Same quantization and the same INT8 matmuls; only fusion may reorder float additions.
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)
