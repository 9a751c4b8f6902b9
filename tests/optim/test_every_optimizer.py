"""Every qt.optim optimizer (CPU offload wrapping torch's AdamW and a low-bit one included) on the unusual
cases: torch's default dtype set to BF16, empty parameters, a batch of zero tokens, frozen parameters."""

import io

import pytest
import torch
from torch import nn

import qt.optim
from qt.optim import CPUOffloadOptimizer

OPTIMIZERS = {
    **{name: getattr(qt.optim, name) for name in ("Adam", "AdamW", "Adam8bit", "AdamW8bit", "Adam4bit", "AdamW4bit",
                                                  "AdamFp8", "AdamWFp8")},
    "CPUOffloadOptimizer(torch AdamW)": CPUOffloadOptimizer,
    "CPUOffloadOptimizer(AdamW8bit)": lambda params, **kwargs: CPUOffloadOptimizer(params, qt.optim.AdamW8bit, **kwargs),
}
every_optimizer = pytest.mark.parametrize("name", OPTIMIZERS)

N_STEPS = 300  # past 256, where a BF16 step counter stops (256 + 1 rounds back to 256)


def _train_under_default_dtype(make_optimizer, default_dtype: torch.dtype):
    """N_STEPS of a (16, 256) weight (quantized by the low-bit variants) with random gradients and of a vector
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


@every_optimizer
def test_bf16_default_dtype_changes_nothing(name):
    """A BF16 step count rounds 1 - beta1**1 to 0 at step 1 (zero-gradient weights become 0 / 0) and stops
    counting at 256."""
    params, optimizer = _train_under_default_dtype(OPTIMIZERS[name], torch.bfloat16)
    steps = [state["step"] for state in optimizer.state.values()]
    assert len(steps) == 2 and all(step.dtype == torch.float32 and step.item() == N_STEPS for step in steps), steps
    assert all(p.isfinite().all() for p in params)
    assert torch.equal(params[1], torch.ones(256))  # zero gradient, no weight decay: no update
    reference, _ = _train_under_default_dtype(OPTIMIZERS[name], torch.float32)
    for p, expected in zip(params, reference):
        assert torch.equal(p, expected)


def _model(*extra: nn.Parameter) -> tuple[nn.Module, list[nn.Parameter]]:
    """A linear layer whose 256-wide rows the low-bit variants quantize, and its parameters plus `extra`."""
    torch.manual_seed(0)
    model = nn.Linear(256, 32)
    return model, [*model.parameters(), *extra]


def _steps(model, optimizer, n_steps=3, batch_size=8, extra=()):
    """Steps on a loss of `model` on random inputs, plus the squares of the `extra` parameters."""
    for step in range(n_steps):
        x = torch.randn(batch_size, 256, generator=torch.Generator().manual_seed(step))
        # A sum (a mean of zero tokens is NaN, which the training loop stops on before any step).
        (model(x).square().sum() + sum(p.square().sum() for p in extra)).backward()
        optimizer.step()
        optimizer.zero_grad()


@every_optimizer
def test_empty_parameters_step_and_round_trip(name):
    """Empty parameters: the FSDP2 shard of a parameter with fewer rows than ranks is one."""
    empty = [nn.Parameter(torch.zeros(shape)) for shape in [(0,), (0, 256), (256, 0)]]
    model, params = _model(*empty)
    optimizer = OPTIMIZERS[name](params, lr=1e-2)
    _steps(model, optimizer, extra=empty)
    reference_model, reference_params = _model()
    _steps(reference_model, OPTIMIZERS[name](reference_params, lr=1e-2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    optimizer.load_state_dict(torch.load(buffer))
    _steps(model, optimizer, n_steps=1, extra=empty)


@every_optimizer
def test_a_batch_of_zero_tokens_leaves_the_weights_as_they_are(name):
    """Zero gradients through quantized states (all-zero blocks) update nothing when there is no weight decay."""
    model, params = _model()
    optimizer = OPTIMIZERS[name](params, lr=1e-2, weight_decay=0.0)
    before = [p.detach().clone() for p in params]
    _steps(model, optimizer, batch_size=0)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    _steps(model, optimizer)
    assert all(p.isfinite().all() and not torch.equal(p, q) for p, q in zip(params, before))


@every_optimizer
def test_frozen_parameters_are_skipped(name):
    frozen = nn.Parameter(torch.ones(16, 256), requires_grad=False)
    model, params = _model(frozen)
    _steps(model, OPTIMIZERS[name](params, lr=1e-2))
    assert torch.equal(frozen, torch.ones(16, 256))
    reference_model, reference_params = _model()
    _steps(reference_model, OPTIMIZERS[name](reference_params, lr=1e-2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
