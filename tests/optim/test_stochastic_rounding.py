"""BF16 stochastic rounding: unbiased, and it lets tiny updates move BF16 weights."""

import pytest
import torch

import qt.optim
from qt.optim import round_to_bf16_stochastic


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The BF16 values just below and above each |x| (x not representable), signed like x."""
    toward_zero = (x.view(torch.int32) & -65536).view(torch.float32)
    away_from_zero = (toward_zero.view(torch.int32) + 65536).view(torch.float32)
    return toward_zero, away_from_zero


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stochastic_rounding_is_unbiased(sign):
    torch.manual_seed(0)
    # 1 + fraction of a BF16 ulp (2**-7 at 1.0): round-to-nearest would always give 1.0 or 1 + ulp.
    fractions = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.9])
    x = sign * (1 + fractions * 2**-7)
    samples = 20_000
    rounded = round_to_bf16_stochastic(x.repeat(samples, 1)).float()

    low, high = _bf16_neighbours(x)
    assert ((rounded == low) | (rounded == high)).all()
    # Rounding away from zero happens with probability = the fraction; its mean is within 5
    # standard errors (sqrt(p(1-p)/samples) ulp) of the exact value.
    ulp = 2**-7
    tolerance = 5 * ulp * torch.sqrt(fractions * (1 - fractions) / samples)
    assert ((rounded.mean(0) - x).abs() <= tolerance).all()


def test_representable_values_are_unchanged():
    x = torch.randn(10_000).bfloat16().float()
    assert torch.equal(round_to_bf16_stochastic(x).float(), x)


def test_bad_input_dtype():
    with pytest.raises(TypeError, match="FP32"):
        round_to_bf16_stochastic(torch.ones(3, dtype=torch.bfloat16))


def _tiny_lr_run(dtype: torch.dtype, stochastic: bool) -> torch.Tensor:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.ones(ELEMENTS, dtype=dtype))
    optimizer = qt.optim.AdamW([weight], lr=LR, weight_decay=0.0, bf16_stochastic_round=stochastic)
    for _ in range(STEPS):
        weight.grad = torch.ones_like(weight)  # Adam's step is then exactly lr
        optimizer.step()
    return weight.detach().float()


ELEMENTS, STEPS, LR = 4096, 300, 1e-4


def test_tiny_learning_rate_moves_bf16_weights_only_with_stochastic_rounding():
    fp32 = _tiny_lr_run(torch.float32, stochastic=False)
    nearest = _tiny_lr_run(torch.bfloat16, stochastic=False)
    stochastic = _tiny_lr_run(torch.bfloat16, stochastic=True)
    assert fp32.mean() == pytest.approx(1 - STEPS * LR, abs=1e-5)
    assert (nearest == 1.0).all()  # each update is 1/78 of an ulp at 1.0 and rounds away
    # Just below 1.0 the BF16 ulp is 2**-8; a step rounds a whole ulp with probability p = LR / ulp,
    # adding variance ulp**2 * p per step. 5 standard errors of the mean over all elements:
    ulp = 2**-8
    tolerance = 5 * ulp * (STEPS * LR / ulp) ** 0.5 / ELEMENTS**0.5  # 3% of the 0.03 moved
    assert stochastic.mean().item() == pytest.approx(fp32.mean().item(), abs=tolerance)
