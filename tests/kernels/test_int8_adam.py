"""The fused Adam / AdamW step of int8_weight_only weights (qt/kernels/int8_adam.py, interpreted on CPU) against
torch's fused step through FP32 copies (the path it replaces) and FP32 AdamW on a plain weight."""

import pytest
import torch

import qt
from qt.recipes import Int8WeightOnlyWeight
from tests.kernels.backends import through


def _weight(rows, cols, dtype, stochastic_rounding, device="cpu"):
    torch.manual_seed(0)
    linear = torch.nn.Linear(cols, rows, bias=False, dtype=dtype, device=device)
    qt.quantize_(linear, "int8_weight_only", filter_fn=lambda m, n: True, stochastic_rounding=stochastic_rounding)
    return linear.weight


def _grads(rows, cols, dtype, steps):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(rows, cols, generator=generator).mul(1e-2).to(dtype) for _ in range(steps)]


def _train(weight, grads, optimizer_kwargs, cls=torch.optim.AdamW, found_inf=None):
    optimizer = cls([weight], fused=True, **optimizer_kwargs)
    if found_inf is not None:
        optimizer.found_inf = found_inf  # as the training loop and GradScaler hand it to the fused step
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    return optimizer.state[weight]


def _kernel_launches(monkeypatch):
    from qt.kernels import int8_adam

    launches = []
    step = int8_adam.int8_rows_adam_step_
    monkeypatch.setattr(int8_adam, "int8_rows_adam_step_", lambda *a, **k: launches.append(1) or step(*a, **k))
    from qt.recipes import int8_weight_only

    monkeypatch.setattr(int8_weight_only, "int8_rows_adam_step_", int8_adam.int8_rows_adam_step_)
    return launches


HYPERPARAMETERS = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    "adamw, tensor lr, maximize": (torch.optim.AdamW, dict(lr=torch.tensor(3e-3), maximize=True, betas=(0.8, 0.95))),
    "adam with L2 weight decay": (torch.optim.Adam, dict(lr=1e-3, weight_decay=0.5, eps=1e-6)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", HYPERPARAMETERS)
@pytest.mark.parametrize("shape", [(5, 37), (3, 300)])
def test_kernel_step_equals_the_step_through_fp32_copies(shape, name, dtype, monkeypatch):
    cls, kwargs = HYPERPARAMETERS[name]
    # Triton's interpreter rounds the bf16 moments it stores toward zero (the GPU and torch round to nearest):
    # one step, so that the next steps do not build on that difference.
    steps = 3 if dtype == torch.float32 else 1
    grads = _grads(*shape, dtype, steps)
    launches = _kernel_launches(monkeypatch)
    results = {}
    for backend in ("triton", "torch"):
        weight = _weight(*shape, dtype, stochastic_rounding=False)
        state = through(backend, _train)(weight, grads, kwargs, cls)
        results[backend] = (weight, state)
    assert len(launches) == steps  # the Triton run took the kernel, the torch run the copies
    (kernel_weight, kernel_state), (copies_weight, copies_state) = results["triton"], results["torch"]
    # Moments depend on the gradients only: the same FP32 math up to an ulp of each operation (an FMA here or
    # there; exp_avg may cancel to small values), stored in the model's dtype (one bf16 ulp: see above).
    for key in ("exp_avg", "exp_avg_sq"):
        assert kernel_state[key].dtype == dtype
        ulp = 2**-7 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(kernel_state[key], copies_state[key], rtol=ulp,
                                   atol=ulp * copies_state[key].abs().max().item())
    # The bias corrections come from exp/log in the kernel and pow in torch: an ulp apart, which may move a
    # value sitting on a rounding boundary by one INT8 step.
    torch.testing.assert_close(kernel_weight.scale, copies_weight.scale, rtol=1e-6, atol=0)
    differ = (kernel_weight.int_data.int() - copies_weight.int_data.int()).abs()
    assert differ.max() <= 1 and differ.float().mean() < 0.01


def test_kernel_step_tracks_fp32_adamw_unbiased():
    """Stochastic rounding in the kernel: updates far below one INT8 step still move the weight, on average by
    what FP32 AdamW moves a plain copy of it."""
    rows, cols = 64, 512
    grads = _grads(rows, cols, torch.float32, steps=1)
    weight = _weight(rows, cols, torch.float32, stochastic_rounding=True)
    reference = weight.dequantize(torch.float32).clone().requires_grad_()
    before = reference.detach().clone()
    through("triton", _train)(weight, grads, dict(lr=1e-5))
    _train(reference, grads, dict(lr=1e-5))
    step_size = weight.scale  # [rows, 1]
    expected_move = (reference.detach() - before) / step_size  # Adam's first step: lr a weight, ~0.03 of an INT8 step
    moved = (weight.dequantize(torch.float32) - before) / step_size
    assert expected_move.abs().max() < 0.1 and (moved != 0).float().mean() > 0.005
    # Mean over 32k elements: the rounding noise (<= 0.5 step each, sd ~0.1) averages to ~1e-3.
    assert abs((moved - expected_move).mean().item()) < 0.005
    # Along the update's direction the weights move by its size on average (RTN would not move them at all).
    along = (moved * expected_move.sign()).mean() / expected_move.abs().mean()
    assert 0.8 < along.item() < 1.2


def test_a_step_with_found_inf_changes_nothing():
    weight = _weight(4, 40, torch.bfloat16, stochastic_rounding=True)
    before = [t.clone() for t in (weight.int_data, weight.scale)]
    state = through("triton", _train)(weight, _grads(4, 40, torch.bfloat16, 2), dict(lr=1e-2), found_inf=torch.ones(()))
    assert torch.equal(weight.int_data, before[0]) and torch.equal(weight.scale, before[1])
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_amsgrad_goes_through_fp32_copies(monkeypatch):
    launches = _kernel_launches(monkeypatch)
    weight = _weight(4, 40, torch.float32, stochastic_rounding=False)
    state = through("triton", _train)(weight, _grads(4, 40, torch.float32, 2), dict(lr=1e-2, amsgrad=True))
    assert not launches and state["max_exp_avg_sq"].any()
    assert isinstance(weight, Int8WeightOnlyWeight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel on a GPU (run with TRITON_INTERPRET=0)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_step_equals_the_step_through_fp32_copies(dtype):
    shape, steps = (96, 5632), 3
    grads = [g.cuda() for g in _grads(*shape, dtype, steps)]
    results = {}
    for backend in ("triton", "torch"):
        weight = _weight(*shape, dtype, stochastic_rounding=False, device="cuda")
        state = through(backend, _train)(weight, grads, dict(lr=1e-3, weight_decay=0.1))
        results[backend] = (weight, state)
    (kernel_weight, kernel_state), (copies_weight, copies_state) = results["triton"], results["torch"]
    for key in ("exp_avg", "exp_avg_sq"):
        ulp = 2**-7 if dtype == torch.bfloat16 else 1e-5  # one bf16 rounding flipped by an FMA upstream
        torch.testing.assert_close(kernel_state[key], copies_state[key], rtol=ulp,
                                   atol=ulp * copies_state[key].abs().max().item())
    # A bf16 moment rounded the other way moves its weight's update by a bf16 ulp: a row's abs-max by ~1e-4.
    torch.testing.assert_close(kernel_weight.scale, copies_weight.scale, rtol=1e-6 if dtype == torch.float32 else 1e-3,
                               atol=0)
    differ = (kernel_weight.int_data.int() - copies_weight.int_data.int()).abs()
    assert differ.max() <= 1 and differ.float().mean() < 0.01
