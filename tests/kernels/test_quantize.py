"""quantize_int8: the Triton kernel (under TRITON_INTERPRET=1) and the torch fallback against a numpy reference."""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from qt.kernels import quantize_int8, quantize_int8_rows_and_cols, quantize_int8_rows_keeping_col_amax
from qt.kernels.fp8 import E4M3, E5M2, quantize_fp8
from qt.kernels.int8_mm import K_BLOCK
from qt.kernels.quantize import _max_keeping_nan, dequantize_rows, quantize_fp8_rows_and_cols, scale_dtype
from tests.kernels import inductor_for_a_gpu
from tests.kernels.backends import through
from tests.reference import rel_err


def one_axis_of_both(x, axis, stochastic_rounding=False):
    """quantize_int8's result for `axis`, taken from the both-axes op (which must agree with it)."""
    q_rows, row_scale, q_cols, col_scale = quantize_int8_rows_and_cols(x, stochastic_rounding)
    return (q_rows, row_scale) if axis == 1 else (q_cols, col_scale)


def with_kept_col_amax(x, axis, stochastic_rounding=False):
    """quantize_int8's result for `axis` the way a linear takes it: by rows keeping the columns' abs-maxima, by
    columns from those (which must agree with it)."""
    q_rows, row_scale, col_amax = quantize_int8_rows_keeping_col_amax(x, stochastic_rounding)
    return (q_rows, row_scale) if axis == 1 else quantize_int8(x, 0, stochastic_rounding, col_amax=col_amax)


PATHS = {f"{name}-{backend}": through(backend, fn) for backend in ("triton", "torch")
         for name, fn in (("one_axis", quantize_int8), ("both_axes", one_axis_of_both),
                          ("kept_col_amax", with_kept_col_amax))}
quantize_paths = pytest.mark.parametrize("quantize", PATHS.values(), ids=PATHS.keys())


def reference_quantize(x: torch.Tensor, axis: int, scales_as: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented math, one slice at a time, in numpy float32 (x times the IEEE reciprocal of its scale, np.rint
    ties to even), with the scales in the dtype of `scales_as`'s scales (default: x's)."""
    slices = (x if axis == 1 else x.t()).float().numpy()
    q = np.empty(slices.shape, dtype=np.int8)
    scales = []
    for i, values in enumerate(slices):
        amax = max(np.abs(values).max(), np.float32(1e-12))
        scale = torch.tensor(amax / np.float32(127)).to(scale_dtype(scales_as or x.dtype))  # bf16: to nearest even
        q[i] = np.clip(np.rint(values * (np.float32(1) / np.float32(scale.float().item()))), -127, 127)
        scales.append(scale)
    q, scale = torch.from_numpy(q), torch.stack(scales)
    return (q, scale[:, None]) if axis == 1 else (q.t(), scale[None, :])


def make_input(kept: int, reduced: int, axis: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """An [R, C] input reducing `reduced` elements per slice, with one all-zero slice and a given memory layout."""
    shape = (kept, reduced) if axis == 1 else (reduced, kept)
    full = torch.randn(shape[0], 2 * shape[1]) * torch.logspace(-3, 3, shape[1] * 2)  # scales spread over decades
    x = {
        "contiguous": full[:, : shape[1]].contiguous(),
        "transposed": full[:, : shape[1]].t().contiguous().t(),
        "strided": full[:, ::2],
    }[layout].to(dtype)
    zero_slice = (kept // 2, slice(None)) if axis == 1 else (slice(None), kept // 2)
    x[zero_slice] = 0
    return x


@quantize_paths
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("axis", [0, 1])
# 9000: wider than a whole-row block, in bfloat16 only (the interpreter takes ~30 s a case; the dtype changes no
# code of the wide path that the narrow shapes leave untested)
@pytest.mark.parametrize(("kept", "reduced", "dtype"),
                         [(kept, reduced, dtype) for kept, reduced in ((1, 1), (17, 70), (37, 1100))
                          for dtype in (torch.float32, torch.bfloat16)]
                         + [pytest.param(3, 9000, torch.bfloat16, marks=pytest.mark.slow)])
def test_round_to_nearest_matches_reference(quantize, kept, reduced, axis, dtype, layout):
    torch.manual_seed(kept * reduced + axis)
    x = make_input(kept, reduced, axis, dtype, layout)
    q, scale = quantize(x, axis)

    rows, cols = x.shape
    assert q.dtype == torch.int8 and q.shape == (rows, cols)
    assert q.stride() == ((cols, 1) if axis == 1 else (1, rows)), "the reduced axis must be contiguous"
    assert scale.dtype == scale_dtype(dtype) and scale.shape == ((rows, 1) if axis == 1 else (1, cols))
    expected_q, expected_scale = reference_quantize(x, axis)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q, expected_q)
    assert (scale > 0).all() and torch.isfinite(q * scale).all()


@quantize_paths
@pytest.mark.parametrize("axis", [0, 1])
def test_ties_round_to_even(quantize, axis):
    # amax = 127 / 16 makes the scale exactly 1/16, so these values land exactly halfway between integers.
    halves = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, -126.5]) / 16
    x = halves[None, :] if axis == 1 else halves[:, None]
    q, scale = quantize(x, axis)
    assert scale.item() == 1 / 16
    assert q.flatten().tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -126]


@quantize_paths
def test_float16_zero_slice_keeps_a_positive_scale(quantize):
    # 1e-12 / 127 would round to 0 in float16 and make 0 / scale a NaN.
    x = torch.randn(5, 70, dtype=torch.float16)
    x[2] = 0
    q, scale = quantize(x, 1)
    assert scale[2].item() > 0 and (q[2] == 0).all()
    expected_q, expected_scale = reference_quantize(x[[0, 1, 3, 4]], 1)
    assert torch.equal(q[[0, 1, 3, 4]], expected_q) and torch.equal(scale[[0, 1, 3, 4]], expected_scale)


# Stochastic rounding. Each repeated value below becomes SAMPLES independent roundings in one call.
SAMPLES_PER_ROW, ROWS = 256, 16
FRACTIONAL_VALUES = [0.25, 0.5, 0.9, -0.1, -1.7, 3.3, 100.01, -126.6]


def repeated_values_input(axis: int) -> torch.Tensor:
    # 127 in the first column sets every slice's scale to 1/16 (exact), the rest are the values to round.
    row = torch.tensor([127.0] + FRACTIONAL_VALUES).repeat_interleave(torch.tensor([1] + [SAMPLES_PER_ROW] * 8)) / 16
    x = row.repeat(ROWS, 1)
    return x if axis == 1 else x.t().contiguous()


@quantize_paths
@pytest.mark.parametrize("axis", [0, 1])
def test_stochastic_rounding_is_unbiased_and_stays_on_the_grid(quantize, axis):
    torch.manual_seed(0)
    x = repeated_values_input(axis)
    q, scale = quantize(x, axis, stochastic_rounding=True)
    assert (scale == 1 / 16).all()

    exact = x.float() / scale.float()
    assert ((q == exact.floor()) | (q == exact.ceil())).all(), "a stochastic rounding left the integer grid"
    samples = (q if axis == 1 else q.t())[:, 1:].reshape(ROWS, len(FRACTIONAL_VALUES), SAMPLES_PER_ROW)
    means = samples.double().mean(dim=(0, 2))
    n = ROWS * SAMPLES_PER_ROW
    for value, mean in zip(FRACTIONAL_VALUES, means.tolist()):
        # Each rounding is floor(v) + Bernoulli(frac(v)): its mean is v and its variance frac * (1 - frac).
        frac = value - math.floor(value)
        five_sigma = 5 * math.sqrt(frac * (1 - frac) / n)
        assert abs(mean - value) < five_sigma, f"mean of {n} roundings of {value} is {mean}"


@pytest.mark.parametrize("name", ["one_axis", "both_axes", "kept_col_amax"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape", [(33, 70), (2, 8200)], ids=["whole_rows", "tiles"])
def test_stochastic_rounding_gives_the_same_bits_through_the_kernels_and_the_torch_ops(name, axis, shape):
    """Both key each element's random number by its index with the same hash of the seed."""
    x = torch.randn(*shape, dtype=torch.bfloat16)
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(7)
        results.append(PATHS[f"{name}-{backend}"](x, axis, stochastic_rounding=True))
    (q, scale), (want_q, want_scale) = results
    assert torch.equal(scale, want_scale) and torch.equal(q, want_q)
    assert not torch.equal(q, reference_quantize(x, axis)[0]), "no element rounded away from the nearest"


@quantize_paths
@pytest.mark.parametrize("axis", [0, 1])
def test_stochastic_rounding_follows_torch_seed(quantize, axis):
    x = torch.randn(33, 70, dtype=torch.bfloat16)
    torch.manual_seed(1)
    first = quantize(x, axis, stochastic_rounding=True)
    second = quantize(x, axis, stochastic_rounding=True)
    torch.manual_seed(1)
    replay = quantize(x, axis, stochastic_rounding=True)
    assert not torch.equal(first[0], second[0]), "two draws gave the same roundings"
    assert torch.equal(first[0], replay[0]) and torch.equal(first[1], replay[1])
    assert torch.equal(first[1], reference_quantize(x, axis)[1]), "stochastic rounding must not change the scale"


@quantize_paths
@pytest.mark.parametrize("axis", [0, 1])
def test_float16_small_slices_keep_their_precision(quantize, axis):
    # Values near 1e-5 give scales near 1e-7, subnormal in float16 (relative error up to 0.24 when the
    # scale is stored there); float32 scales keep INT8's nominal precision.
    x = (torch.randn(6, 40) * 1e-5).to(torch.float16)
    x = x if axis == 1 else x.t().contiguous()
    q, scale = quantize(x, axis)
    assert scale.dtype == torch.float32
    assert rel_err(q.float() * scale, x.float()) < 0.01


@quantize_paths
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_give_non_finite_results(quantize, axis, bad):
    """Only the slices holding a non-finite value get an infinite scale; the others quantize as usual."""
    x = torch.randn(5, 70)
    x = x if axis == 1 else x.t().contiguous()
    bad_slice = (2, slice(None)) if axis == 1 else (slice(None), 2)
    x[(2, 7) if axis == 1 else (7, 2)] = bad
    q, scale = quantize(x, axis)
    dequantized = q.float() * scale
    assert not torch.isfinite(dequantized[bad_slice]).all()
    good = [i for i in range(5) if i != 2]
    good_part = dequantized[good] if axis == 1 else dequantized[:, good]
    expected = reference_quantize(x[good] if axis == 1 else x[:, good].contiguous(), axis)
    assert torch.equal(good_part, expected[0].float() * expected[1])


@quantize_paths
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape", [(0, 70), (33, 0)])
def test_empty_inputs(quantize, axis, shape):
    q, scale = quantize(torch.randn(shape), axis)
    assert q.shape == shape and scale.shape == ((shape[0], 1) if axis == 1 else (1, shape[1]))
    assert (scale > 0).all()


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("stochastic", [False, True])
def test_opcheck(axis, stochastic):
    x = torch.randn(17, 33, dtype=torch.bfloat16)
    seed = torch.tensor([1234]) if stochastic else None
    torch.library.opcheck(torch.ops.qt.quantize_int8.default, (x, axis, seed, None))
    if axis == 0:
        torch.library.opcheck(torch.ops.qt.quantize_int8.default, (x, axis, seed, torch.rand(17)))
        torch.library.opcheck(torch.ops.qt.quantize_int8.default,
                              (torch.randn(300, 33, dtype=torch.bfloat16), axis, seed, torch.rand(300), None, True))
        torch.library.opcheck(torch.ops.qt.quantize_int8.default, (x, axis, seed, None, torch.rand(33) * 4))
    else:
        torch.library.opcheck(torch.ops.qt.quantize_int8_rows_keeping_col_amax.default, (x, seed))
    seeds = torch.tensor([1234, 99]) if stochastic else None
    for multipliers in (None, torch.rand(17, dtype=torch.bfloat16)):
        torch.library.opcheck(torch.ops.qt.quantize_int8_rows_and_cols.default, (x, seeds, multipliers))


@pytest.mark.parametrize(
    ("x", "axis", "error", "message"),
    [
        pytest.param(torch.ones(4, 4, dtype=torch.int8), 1, TypeError, "float32, bfloat16 or float16", id="int8"),
        pytest.param(torch.ones(4, 4, dtype=torch.float64), 1, TypeError, "must be float32", id="float64"),
        pytest.param(torch.ones(4), 0, ValueError, "must be 2-D", id="1-D"),
        pytest.param(torch.ones(2, 4, 4), 1, ValueError, "must be 2-D", id="3-D"),
        pytest.param(torch.ones(4, 4), 2, ValueError, "axis must be 0", id="axis 2"),
        pytest.param(torch.ones(4, 4), -1, ValueError, "axis must be 0", id="axis -1"),
    ],
)
def test_bad_inputs_raise(x, axis, error, message):
    with pytest.raises(error, match=message):
        quantize_int8(x, axis)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 91), (1, 300), (70, 1)])
def test_dequantize_rows_kernel_is_the_float32_product_rounded_once(dtype, shape):
    torch.manual_seed(0)
    q = torch.randint(-127, 128, shape, dtype=torch.int8)
    scale = torch.logspace(-6, 2, shape[0])[:, None] * torch.rand(shape[0], 1)  # scales over decades
    expected = (q.double() * scale.double()).float().to(dtype)  # exact product, rounded to fp32, then to dtype
    for backend in ("triton", "torch"):
        assert torch.equal(through(backend, dequantize_rows)(q, scale, dtype), expected), backend


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 70), (70, 37), (1, 9)])
def test_columns_of_rows_multiplied(backend, dtype, shape):
    """col_row_multipliers: the column-wise result is that of x with each row multiplied by its number (the product
    exact in float32), the row-wise one that of x, and quantize_int8's by columns with row_multipliers the same; the
    multipliers span decades and include a zero row."""
    x = make_input(shape[1], shape[0], 0, dtype, "contiguous")
    multipliers = torch.logspace(-4, 2, shape[0]).to(dtype)
    multipliers[shape[0] // 2] = 0
    q_rows, row_scale, q_cols, col_scale = through(backend, quantize_int8_rows_and_cols)(
        x, col_row_multipliers=multipliers[:, None])
    one_axis = through(backend, quantize_int8)(x, 0, row_multipliers=multipliers)
    expected_cols = reference_quantize(x.float() * multipliers.float()[:, None], 0, scales_as=dtype)
    for (q, scale), expected in (((q_rows, row_scale), reference_quantize(x, 1)), ((q_cols, col_scale), expected_cols),
                                 (one_axis, expected_cols)):
        assert q.stride() == expected[0].stride() and scale.dtype == expected[1].dtype
        assert torch.equal(scale, expected[1]) and torch.equal(q, expected[0])


def test_columns_of_rows_multiplied_round_stochastically_around_the_product():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    multipliers = torch.rand(64) + 0.5
    draws = [through("triton", quantize_int8_rows_and_cols)(x, True, multipliers)[2:] for _ in range(300)]
    mean = torch.stack([q.float() * scale for q, scale in draws]).mean(0)
    assert rel_err(mean, x * multipliers[:, None]) < 0.01


@pytest.mark.parametrize(("multipliers", "message"), [
    (torch.ones(5, 1), r"must be floating \[4, 1\] or \[4\]"),
    (torch.ones(1, 4), r"must be floating \[4, 1\] or \[4\]"),
    (torch.ones(4, dtype=torch.int32), r"must be floating"),
    (torch.ones(4, device="meta"), "is on meta, x on cpu"),
], ids=["too_many", "a_row", "integers", "another_device"])
def test_bad_row_multipliers_raise(multipliers, message):
    with pytest.raises(ValueError, match=message):
        quantize_int8_rows_and_cols(torch.ones(4, 6), col_row_multipliers=multipliers)
    with pytest.raises(ValueError, match=message):
        quantize_int8(torch.ones(4, 6), 0, row_multipliers=multipliers)


@pytest.mark.parametrize("argument", ["row_multipliers", "col_amax", "k_blocks"])
def test_row_multipliers_col_amax_and_k_blocks_go_with_column_scales(argument):
    with pytest.raises(ValueError, match="row_multipliers, col_amax and k_blocks go with axis=0"):
        quantize_int8(torch.ones(4, 6), 1, **{argument: True if argument == "k_blocks" else torch.ones(6)})


def test_k_blocks_take_no_col_amax():
    with pytest.raises(ValueError, match="k_blocks takes each block's abs-max itself"):
        quantize_int8(torch.ones(4, 6), 0, col_amax=torch.ones(6), k_blocks=True)


def reference_column_blocks(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """reference_quantize by columns of each block of K_BLOCK rows: the codes [R, C] and the scales [blocks, C]."""
    blocks = [reference_quantize(x[start:start + K_BLOCK], 0, scales_as=dtype) for start in range(0, len(x), K_BLOCK)]
    return torch.cat([q for q, _ in blocks]), torch.cat([scale for _, scale in blocks])


# Rows of one block, one and a bit, several with a partial last one, a single row; multipliers or none.
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("multiplied", [False, True], ids=["plain", "rows_multiplied"])
@pytest.mark.parametrize("shape", [(128, 5), (129, 33), (300, 70), (1, 3)])
def test_column_blocks_match_the_reference(backend, dtype, multiplied, shape):
    torch.manual_seed(shape[0])
    # Rows whose magnitudes span decades, so that blocks get scales of their own.
    x = (torch.randn(shape) * torch.logspace(-3, 3, shape[0])[:, None]).to(dtype)
    multipliers = (torch.rand(shape[0]) + 0.5).to(dtype) if multiplied else None
    q, scale = through(backend, quantize_int8)(x, 0, row_multipliers=multipliers, k_blocks=True)
    expected_q, expected_scale = reference_column_blocks(
        x.float() * multipliers.float()[:, None] if multiplied else x, dtype)
    assert q.stride() == (1, shape[0]) and scale.shape == (triton.cdiv(shape[0], K_BLOCK), shape[1])
    assert scale.dtype == scale_dtype(dtype) and torch.equal(scale, expected_scale) and torch.equal(q, expected_q)


def test_column_blocks_round_stochastically_without_bias_and_alike_in_kernels_and_torch():
    torch.manual_seed(0)
    x = torch.randn(300, 8) * torch.logspace(-2, 2, 300)[:, None]
    draws = []
    for seed in range(200):
        results = []
        for backend in ("triton", "torch"):
            torch.manual_seed(seed)
            results.append(through(backend, quantize_int8)(x, 0, True, k_blocks=True))
        assert all(torch.equal(a, b) for a, b in zip(*results))
        q, scale = results[0]
        draws.append(q.float() * scale.repeat_interleave(K_BLOCK, 0)[:300])
    # Block by block: rounding to nearest errs by up to half a step of each block's scale; the mean of 200
    # unbiased draws by about a tenth of that.
    nearest_q, nearest_scale = quantize_int8(x, 0, k_blocks=True)
    step = nearest_scale.repeat_interleave(K_BLOCK, 0)[:300]
    assert ((torch.stack(draws).mean(0) - x).abs() / step).mean() < 0.05


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_non_finite_value_makes_only_its_column_block_non_finite(backend):
    x = torch.randn(300, 5)
    x[200, 3] = float("nan")
    q, scale = through(backend, quantize_int8)(x, 0, k_blocks=True)
    non_finite = ~torch.isfinite(scale)
    assert non_finite[1, 3] and non_finite.sum() == 1


WIDE_SHAPES = [pytest.param(shape, marks=pytest.mark.slow) for shape in ((260, 2100), (3, 9000))]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(37, 70), (1, 9), (70, 1), (4100, 40), *WIDE_SHAPES])
def test_kept_col_amax_is_each_columns_abs_max_with_nan_as_inf(backend, shape):
    """(4100 rows: 32 rows a program in blocks of 8, and a last program partly out of bounds; 2100 columns: blocks
    of two rows in a software pipeline, 16 rows a program, the last partly out of bounds; 9000: wider than a
    whole-row block, the tiles' abs-max pass takes it.) A column holding NaN gets inf, and its column-wise
    quantization an infinite scale."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.bfloat16) * torch.logspace(-3, 3, shape[1]).to(torch.bfloat16)
    x[0, shape[1] // 2] = float("nan")
    expected = x.float().abs().amax(0, keepdim=True)
    expected[0, shape[1] // 2] = float("inf")
    q, scale, col_amax = through(backend, quantize_int8_rows_keeping_col_amax)(x)
    assert col_amax.dtype == torch.float32 and torch.equal(col_amax, expected)
    assert all(torch.equal(a, b) for a, b in zip((q, scale), through(backend, quantize_int8)(x, 1)))
    col_scale = through(backend, quantize_int8)(x, 0, col_amax=col_amax)[1]
    assert col_scale[0, shape[1] // 2] == float("inf")


@pytest.mark.parametrize(("col_amax", "message"), [
    (torch.ones(1, 5), r"must be float32 \[1, 6\] or \[6\]"),
    (torch.ones(6, 1), r"must be float32 \[1, 6\] or \[6\]"),
    (torch.ones(6, dtype=torch.bfloat16), "must be float32"),
    (torch.ones(6, device="meta"), "is on meta, x on cpu"),
], ids=["too_few", "a_column", "bfloat16", "another_device"])
def test_bad_col_amax_raises(col_amax, message):
    with pytest.raises(ValueError, match=message):
        quantize_int8(torch.ones(4, 6), 0, col_amax=col_amax)


# Two INT8 linears sharing their input, compiled for training: the joint graph after the common-subexpression
# elimination that torch.compile's partitioner applies, and the allocations each kernel launch writes into.
_ALLOCATIONS_SCRIPT = """
import qt
from functorch.compile import aot_function
from torch._functorch.compile_utils import fx_graph_cse

gate, up = (torch.nn.Linear(128, 256, bias=False).bfloat16() for _ in range(2))
for linear in (gate, up):
    qt.quantize_(linear, "int8_mixed_precision", grad_weight_sees_quantized_input=False,
                 filter_fn=lambda module, name: True)
joint = []

def keep_joint(graph_module, inputs, **kwargs):
    joint.append(fx_graph_cse(graph_module.graph))
    raise SystemExit

def swiglu_like(x, w_gate, w_up):
    return torch.nn.functional.linear(x, w_gate) * torch.nn.functional.linear(x, w_up)

x = torch.randn(256, 128, dtype=torch.bfloat16, requires_grad=True)
try:
    aot_function(swiglu_like, fw_compiler=None, partition_fn=keep_joint)(x, gate.weight, up.weight)
except SystemExit:
    pass
for node in joint[0].nodes:
    if "triton_kernel_wrapper" in str(node.target) and "q_ptr" in node.kwargs["kwargs"]:
        print("writes", node.kwargs["kwargs"]["q_ptr"].name)
"""


@pytest.mark.slow  # a process of its own, tracing for compile
def test_each_kernel_writes_its_own_allocation_after_compile_merges_common_subexpressions(tmp_path):
    result = inductor_for_a_gpu.run(_ALLOCATIONS_SCRIPT, tmp_path)
    written = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("writes ")]
    # Each linear's six passes that write codes: X and W by rows, dY both ways, W and X by columns.
    assert len(written) == 12, result.stdout + result.stderr[-3000:]
    assert len(set(written)) == len(written), f"kernels share an allocation, which Inductor copies for each: {written}"


def _layout(t: torch.Tensor) -> tuple[tuple[int, int], ...]:
    return tuple((dim, stride) for dim, (size, stride) in enumerate(zip(t.shape, t.stride())) if size > 1)


def same_codes(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The same dtype, layout and bytes, except that a NaN may be any NaN (torch keeps its sign, a GPU's cast not). The
    layout is the strides of the dimensions longer than 1: a [1, C] scale may have row stride C or 1."""
    if got.dtype != want.dtype or got.shape != want.shape or (got.numel() and _layout(got) != _layout(want)):
        return False
    if got.dtype not in (E4M3, E5M2):
        return torch.equal(got, want)
    got_nan, want_nan = got.float().isnan(), want.float().isnan()
    return torch.equal(got_nan, want_nan) and torch.equal(got.view(torch.uint8)[~got_nan],
                                                          want.view(torch.uint8)[~want_nan])


FP8_FORMATS = [(E4M3, E4M3, False), (E5M2, E4M3, False), (E4M3, E5M2, True)]  # (rows, columns, powers of two)


@pytest.mark.parametrize(("row_dtype", "col_dtype", "power_of_two", "multiplied", "shape"),
                         [(*formats, multiplied, shape) for formats in FP8_FORMATS for multiplied in (False, True)
                          for shape in ((37, 70), (1, 9), (70, 1), (300, 129), (0, 5), (4, 0))]
                         # The tile passes of 9000 columns (~25 s a case in the interpreter) with each format once.
                         + [pytest.param(*formats, multiplied, (5, 9000), marks=pytest.mark.slow)
                            for formats, multiplied in zip(FP8_FORMATS, (False, True, True))])
def test_fp8_rows_and_cols_are_quantize_fp8_along_each_axis(row_dtype, col_dtype, power_of_two, multiplied, shape):
    """A linear's dY in FP8 with row-wise scales, both ways (qt/linear.py): qt's kernels (here through the interpreter,
    whose own FP8 cast the kernel works around) give quantize_fp8's bits by rows and, of x times the multipliers, by
    columns: scales, codes (ties to even, -0.0, subnormals, NaN and inf), layouts. 9000 columns: the tile passes."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.bfloat16) * torch.logspace(-6, 3, shape[1]).to(torch.bfloat16)
    if x.numel() > 3:
        x[shape[0] // 2, shape[1] // 3], x[-1, -1], x[0, 0] = float("nan"), float("inf"), -float("inf")
    multipliers = torch.rand(shape[0], 1, dtype=torch.bfloat16) * 8 if multiplied else None
    of_columns = x if multipliers is None else x.float() * multipliers.float()
    expected = (*quantize_fp8(x, 1, row_dtype, "rowwise", power_of_two),
                *quantize_fp8(of_columns, 0, col_dtype, "rowwise", power_of_two))
    for backend in ("triton", "torch"):
        got = through(backend, quantize_fp8_rows_and_cols)(x, row_dtype, col_dtype, power_of_two, power_of_two,
                                                          multipliers)
        assert all(same_codes(*pair) for pair in zip(got, expected)), backend
        assert got[1].dtype == got[3].dtype == torch.float32


def test_fp8_rows_and_cols_opcheck_and_bad_inputs():
    x = torch.randn(17, 33, dtype=torch.bfloat16)
    for multipliers in (None, torch.rand(17, dtype=torch.bfloat16)):
        torch.library.opcheck(torch.ops.qt.quantize_fp8_rows_and_cols.default, (x, E4M3, E5M2, False, True, multipliers))
    with pytest.raises(ValueError, match=r"col_row_multipliers must be floating \[17, 1\] or \[17\]"):
        quantize_fp8_rows_and_cols(x, E4M3, E4M3, col_row_multipliers=torch.rand(16))
    with pytest.raises(ValueError, match="the code dtypes must be torch.float8_e4m3fn or torch.float8_e5m2"):
        quantize_fp8_rows_and_cols(x, torch.int8, E4M3)


_MAX_CALLS = []


@triton.jit
def _counted_max_keeping_nan(a, b):  # run by Triton's interpreter only, which calls it as Python
    _MAX_CALLS.append(1)
    return _max_keeping_nan(a, b)


@pytest.mark.parametrize("shape", [(9, 40), (20, 130)])
def test_gpu_maxima_formulation_gives_the_interpreted_results(monkeypatch, shape):
    """On a GPU the kernels take abs-maxima with NaN-propagating max instructions and turn NaN into inf once per
    result; the interpreter, where a reduction with a combine function of its own is slow, takes tl.max of |x| with
    NaN made inf first. Run the GPU formulation under the interpreter: the same bits, NaN and inf included."""
    from qt.kernels import quantize

    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.bfloat16)
    x[1, 3], x[4, 7], x[5, 0] = float("nan"), float("inf"), -float("inf")
    multipliers = torch.rand(shape[0], 1, dtype=torch.bfloat16) + 0.5

    def results():
        # FP8's scales only: the GPU formulation's FP8 cast is the interpreter's own, which rounds wrongly.
        fp8_scales = quantize_fp8_rows_and_cols(x, E4M3, E5M2, col_row_multipliers=multipliers)[1::2]
        return (*quantize_int8_rows_and_cols(x, False, multipliers), *quantize_int8_rows_keeping_col_amax(x),
                *fp8_scales, *quantize_int8(x, 0))

    monkeypatch.setenv("QT_KERNEL_BACKEND", "triton")
    interpreted = results()
    _MAX_CALLS.clear()
    monkeypatch.setattr(quantize, "_INTERPRETED", tl.constexpr(False))
    monkeypatch.setattr(quantize, "_max_keeping_nan", _counted_max_keeping_nan)
    on_gpu = results()
    assert _MAX_CALLS  # the GPU formulation ran
    assert all(torch.equal(a, b) for a, b in zip(interpreted, on_gpu))
    col_scale, fp8_row_scale = interpreted[3], interpreted[7]
    assert torch.isinf(col_scale[0, [0, 3, 7]]).all() and torch.isfinite(col_scale[0, 1])
    assert torch.isinf(fp8_row_scale[[1, 4, 5], 0]).all() and torch.isfinite(fp8_row_scale[0, 0])
