"""qt.optim.CPUOffloadOptimizer against the optimizer it wraps. On a CPU-only machine the "offload" is
CPU to CPU, but every part runs: the gradient hooks, accumulation over micro-steps, clipping on the
offloaded gradients, FP32 masters, the copy back and state_dict."""

import copy
import gc
import io
import weakref

import pytest
import torch
from torch import nn

import qt
from qt.optim import CPUOffloadOptimizer
from qt.training.loop import clip_gradients


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(dtype)


def _train(model, optimizer, steps, micro_steps=2, clip=0.05, start=0, norms=None) -> list[float]:
    """Steps of `micro_steps` accumulated micro-batches each, clipped; the loss of every step."""
    losses = []
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        total = 0.0
        for _ in range(micro_steps):
            x = torch.randn(32, 64, generator=generator).to(model[0].weight.device, model[0].weight.dtype)
            loss = (model(x) - x.flip(1)).square().mean() / micro_steps
            loss.backward()
            total += loss.item()
        norm = clip_gradients(model, optimizer, clip)
        if norms is not None:
            norms.append(norm.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def test_matches_the_wrapped_optimizer_exactly_with_accumulation_and_clipping():
    reference, offloaded = _model(), _model()
    kwargs = dict(lr=3e-3, weight_decay=0.1, fused=True)
    reference_losses = _train(reference, torch.optim.AdamW(reference.parameters(), **kwargs), 20)
    optimizer = CPUOffloadOptimizer(offloaded.parameters(), torch.optim.AdamW, **kwargs)
    norms = []
    assert _train(offloaded, optimizer, 20, norms=norms) == reference_losses
    assert min(norms) > 0.05  # clipping acted on every step
    for expected, actual in zip(reference.parameters(), offloaded.parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert all(p.grad is None for p in offloaded.parameters())  # gradients leave the model at once


def test_fp32_masters_keep_the_updates_that_bf16_weights_round_away():
    """At a learning rate below BF16's resolution, pure BF16 AdamW leaves most weights where they are
    (each step's update rounds away); the offloaded FP32 masters follow an FP32 AdamW fed the same
    gradients, exactly, and the BF16 weights, their rounding, move (measured: 7% vs 81% of the elements)."""
    lr, steps = 2e-5, 40
    stalled = _model(torch.bfloat16)
    initial = copy.deepcopy(stalled)
    n_elements = sum(p.numel() for p in initial.parameters())
    _train(stalled, torch.optim.AdamW(stalled.parameters(), lr=lr), steps, micro_steps=1, clip=1e9)
    assert sum((a != b).sum().item() for a, b in zip(stalled.parameters(), initial.parameters())) < 0.15 * n_elements

    model = _model(torch.bfloat16)
    optimizer = CPUOffloadOptimizer(model.parameters(), lr=lr)
    masters = [optimizer.masters[p] for p in model.parameters()]
    reference = [m.clone().requires_grad_() for m in masters]
    reference_optimizer = torch.optim.AdamW(reference, lr=lr, fused=True)
    for step in range(steps):
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        (model(x) - x.flip(1)).float().square().mean().backward()
        optimizer.clip_grad_norm_(1e9)  # gathers the gradients: hand the same ones to the reference
        for r, m in zip(reference, masters):
            r.grad = m.grad.clone()
        optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.step()
    moved = sum((p != p0).sum().item() for p, p0 in zip(model.parameters(), initial.parameters()))
    assert moved > 0.6 * n_elements
    for r, m, p in zip(reference, masters, model.parameters()):
        torch.testing.assert_close(m, r.detach(), rtol=0, atol=0)
        assert torch.equal(p, m.to(torch.bfloat16))


def test_state_dict_round_trip_continues_exactly():
    model = _model()
    optimizer = CPUOffloadOptimizer(model.parameters(), lr=3e-3)
    _train(model, optimizer, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    continued = _train(model, optimizer, 5, start=5)

    restored = _model()
    restored_optimizer = CPUOffloadOptimizer(restored.parameters(), lr=3e-3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    restored.load_state_dict(saved["model"])
    restored_optimizer.load_state_dict(saved["optimizer"])
    assert _train(restored, restored_optimizer, 5, start=5) == continued


def test_param_groups_written_after_loading_a_state_reach_the_step():
    model = _model()
    optimizer = CPUOffloadOptimizer(model.parameters(), lr=1.0)
    _train(model, optimizer, 1)
    optimizer.load_state_dict(optimizer.state_dict())
    for group in optimizer.param_groups:  # how the training loop sets the learning rate
        group["lr"] = 0.0
    before = [p.clone() for p in model.parameters()]
    _train(model, optimizer, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_an_lr_scheduler_reaches_the_step():
    model = _model()
    optimizer = CPUOffloadOptimizer(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)  # lr 0: nothing may move
    before = [p.clone() for p in model.parameters()]
    _train(model, optimizer, 2)
    scheduler.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optimizer.inner.param_groups[0]["lr"] == 0.0


def test_the_model_and_optimizer_are_freed_when_dropped():
    """The gradient hooks must not keep the optimizer (and with it the model and its masters) alive."""
    model = _model()
    optimizer = CPUOffloadOptimizer(model.parameters(), lr=1e-3)
    _train(model, optimizer, 2)
    weight, master = weakref.ref(model[0].weight), weakref.ref(optimizer.masters[model[0].weight])
    del model, optimizer
    gc.collect()
    assert weight() is None and master() is None


def test_quantized_weights_are_refused_with_what_to_do():
    model = qt.quantize_(_model(torch.bfloat16), "int8_weight_only")
    with pytest.raises(ValueError, match="cannot offload quantized or FSDP2-sharded weights .* --quantize none"):
        CPUOffloadOptimizer(model.parameters(), lr=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path (side stream, pinned copies) needs CUDA")
def test_on_a_gpu_follows_the_wrapped_optimizer_and_leaves_only_the_weights_there():
    reference, offloaded = _model().cuda(), _model().cuda()
    kwargs = dict(lr=3e-3, weight_decay=0.1)
    reference_losses = _train(reference, torch.optim.AdamW(reference.parameters(), fused=True, **kwargs), 20)
    losses = _train(offloaded, CPUOffloadOptimizer(offloaded.parameters(), **kwargs), 20)
    torch.testing.assert_close(losses, reference_losses, rtol=1e-4, atol=0)  # CPU vs CUDA float rounding

    model = _model(torch.bfloat16).cuda()
    optimizer = CPUOffloadOptimizer(model.parameters(), lr=3e-3)
    weights_bytes = torch.cuda.memory_allocated()
    _train(model, optimizer, 3)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == weights_bytes  # no gradients, no states on the GPU
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p.cpu(), optimizer.masters[p].to(torch.bfloat16))
