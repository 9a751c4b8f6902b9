"""Every qt.optim optimizer under `torch.set_default_dtype(torch.bfloat16)`: step counts and bias
corrections must not follow the default dtype (a BF16 step counter rounds 1 - beta**step to 0 at step 1,
turning zero-gradient weights into NaN, and stops counting at 256)."""

import pytest
import torch
from torch import nn

import qt.optim
from qt.optim import CPUOffloadOptimizer

N_STEPS = 300  # past 256, where a BF16 counter stops (256 + 1 rounds back to 256)

OPTIMIZERS = {
    **{name: getattr(qt.optim, name) for name in ("Adam", "AdamW", "Adam8bit", "AdamW8bit", "Adam4bit", "AdamW4bit",
                                                  "AdamFp8", "AdamWFp8")},
    "CPUOffloadOptimizer(torch AdamW)": CPUOffloadOptimizer,
    "CPUOffloadOptimizer(AdamW8bit)": lambda params, **kwargs: CPUOffloadOptimizer(params, qt.optim.AdamW8bit, **kwargs),
}


def _train_under_default_dtype(make_optimizer, default_dtype: torch.dtype):
    """N_STEPS of a (16, 256) weight (quantized by the low-bit variants) with random gradients and a vector
    whose gradient is always zero; FP32 parameters either way. Returns (parameters, optimizer)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        generator = torch.Generator().manual_seed(0)
        weight = nn.Parameter(torch.randn(16, 256, generator=generator, dtype=torch.float32))
        zero_grad = nn.Parameter(torch.ones(256, dtype=torch.float32))
        optimizer = make_optimizer([weight, zero_grad], lr=1e-3, weight_decay=0.0)
        for _ in range(N_STEPS):
            # A backward pass rather than assigning .grad: CPU offload takes gradients from its hooks.
            noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
            ((weight * noise).sum() + (zero_grad * 0).sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_default_dtype(previous)
    return [weight.detach(), zero_grad.detach()], optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bf16_default_dtype_changes_nothing(name):
    params, optimizer = _train_under_default_dtype(OPTIMIZERS[name], torch.bfloat16)
    steps = [state["step"] for state in optimizer.state.values()]
    assert len(steps) == 2 and all(step.dtype == torch.float32 and step.item() == N_STEPS for step in steps), steps
    assert all(p.isfinite().all() for p in params)
    assert torch.equal(params[1], torch.ones(256))  # zero gradient, no weight decay: no update
    reference, _ = _train_under_default_dtype(OPTIMIZERS[name], torch.float32)
    for p, expected in zip(params, reference):
        assert torch.equal(p, expected)
