"""FP8 mixed precision against float64 references of its math, the FP8 scales, the matmul's two paths, its
errors, and its loss against the unquantized twin's."""

import pytest
import torch

import llm_pretrain
import qt
from qt.kernels import fp8
from qt.kernels.fp8 import E4M3, E5M2, quantize_fp8, scale_from_amax, scaled_fp8_mm
from tests.recipes.linear_harness import assert_same_math, identity, make_case, reference, run_linear
from tests.reference import fake_quant_fp8, rel_err, sqnr_db

GRAD_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}
PLAN_OPTIONS = [dict(scaling=s, grad_dtype=g, power_of_two_scales=p)
                for s in ("tensorwise", "rowwise") for g in ("e4m3", "e5m2") for p in (False, True)]


@pytest.mark.parametrize("options", PLAN_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("flags", [(True, True, True), (True, True, False), (False, True, True)])
@pytest.mark.parametrize(("shape", "bias"), [((5,), False), ((3, 7), True)])
def test_fp8_mixed_precision_matches_reference(options, flags, shape, bias):
    output, grad_input, grad_weight = flags
    linear, x, dy = make_case(shape, bias)
    w, b = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    # X quantized by columns for grad_weight (row-wise, the default reads X's codes: tests/test_linear.py).
    qt.quantize_(linear, "fp8_mixed_precision", output=output, grad_input=grad_input, grad_weight=grad_weight,
                 grad_weight_sees_quantized_input=False, filter_fn=lambda m, n: True, **options)
    got = run_linear(linear, x, dy)
    out, gx, gw, _ = got

    tensorwise, power_of_two = options["scaling"] == "tensorwise", options["power_of_two_scales"]

    def q(axis, on, dtype=E4M3):
        return (lambda t: fake_quant_fp8(t.float(), axis, dtype, tensorwise, power_of_two)) if on else identity

    grad_dtype = GRAD_DTYPES[options["grad_dtype"]]
    # The emulated matmul: FP8 products exact in float32, float32 sums, the scales applied once.
    assert_same_math(got, reference(w, b, x, dy, q(1, output), q(1, output), q(1, grad_input, grad_dtype),
                                    q(0, grad_input), q(0, grad_weight, grad_dtype), q(0, grad_weight)), dy)

    # Against the unquantized linear: E4M3 keeps 3 mantissa bits (~29 dB an operand on Gaussian data), E5M2 2.
    plain_out, plain_gx, plain_gw = reference(w, b, x, dy, *[identity] * 6)
    floor = 20 if options["grad_dtype"] == "e5m2" else 24
    assert sqnr_db(out, plain_out) > 24
    assert sqnr_db(gx, plain_gx) > floor
    assert sqnr_db(gw, plain_gw) > floor


def test_the_recipe_defaults_and_grad_dtype_auto():
    tensorwise, rowwise = qt.Fp8MixedPrecisionConfig(), qt.Fp8MixedPrecisionConfig(scaling="rowwise")
    assert tensorwise.scaling == "tensorwise"
    assert tensorwise.plan.grad_input.grad_dtype == E5M2 and rowwise.plan.grad_input.grad_dtype == E4M3
    assert tensorwise.plan.output.grad_dtype == E4M3 and tensorwise.plan.output.fast_accumulation
    assert not tensorwise.plan.grad_weight.fast_accumulation
    assert not qt.Fp8MixedPrecisionConfig(grad_weight=False).plan.grad_weight.quantized


@pytest.mark.parametrize(("options", "sees_codes"), [
    ({}, False), ({"scaling": "rowwise"}, True), ({"scaling": "rowwise", "grad_input": False}, True),
    ({"scaling": "rowwise", "output": False}, False), ({"scaling": "rowwise", "grad_weight": False}, False),
    ({"scaling": "rowwise", "grad_weight_sees_quantized_input": False}, False),
    ({"grad_weight_sees_quantized_input": True}, True),
])
def test_grad_weight_sees_the_forwards_codes_by_default_row_wise(options, sees_codes):
    config = qt.resolve_recipe("fp8_mixed_precision", **options)
    assert config.grad_weight_sees_quantized_input is sees_codes
    assert config.plan.grad_weight_sees_quantized_input is sees_codes


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("power_of_two", [False, True])
def test_quantize_fp8_rounds_to_the_nearest_fp8_value(dtype, scaling, axis, power_of_two):
    """With power-of-two scales x / scale is exact, so q * scale is x rounded to FP8 exactly; with float32
    scales, the float32 quotient rounds once more (a tie moves about once in 2^20 values)."""
    torch.manual_seed(0)
    x = torch.randn(37, 45) * torch.exp(torch.randn(37, 1) * 3)  # rows of very different magnitudes
    q, scale = quantize_fp8(x, axis, dtype, scaling, power_of_two)
    assert q.dtype == dtype and scale.dtype == torch.float32
    assert q.stride() == ((45, 1) if axis == 1 else (1, 37))  # the reduced axis contiguous
    assert scale.shape == ((1, 1) if scaling == "tensorwise" else (37, 1) if axis == 1 else (1, 45))
    expected = fake_quant_fp8(x, axis, dtype, scaling == "tensorwise", power_of_two)
    assert torch.equal(q.double() * scale.double(), expected)


def test_scales_come_from_the_abs_max_on_the_device():
    amax = torch.tensor([[448.0], [449.0], [447.0], [0.448], [57344.0], [torch.inf]])
    torch.testing.assert_close(scale_from_amax(amax, E4M3), amax / 448, rtol=0, atol=0)
    assert scale_from_amax(torch.tensor([[57344.0]]), E5M2).item() == 1.0
    # Rounded up to a power of two: never below amax / max (no overflow), and exact powers stay.
    assert scale_from_amax(amax, E4M3, power_of_two_scales=True).flatten().tolist() == [
        1.0, 2.0, 1.0, 2.0**-9, 128.0, float("inf")]
    # One scale per row, per column, or for the tensor; its abs-max includes negative values.
    x = torch.tensor([[1.0, -896.0], [0.5, 3.5]])
    assert torch.equal(quantize_fp8(x, 1)[1], torch.tensor([[896.0], [3.5]]) / 448)
    assert torch.equal(quantize_fp8(x, 0)[1], torch.tensor([[1.0, 896.0]]) / 448)
    assert torch.equal(quantize_fp8(x, 0, scaling="tensorwise")[1], torch.tensor([[2.0]]))


@pytest.mark.parametrize(("scaling", "axis"), [("rowwise", 1), ("rowwise", 0), ("tensorwise", 1), ("tensorwise", 0)])
def test_abs_maxima_taken_earlier_give_the_same_cast(scaling, axis):
    """What a linear passes from an earlier pass (dY's row and column maxima, a tensor's abs-max): the same codes and
    scales as the cast's own; maxima of another shape are a one-line error."""
    x = torch.randn(37, 70) * torch.logspace(-2, 2, 70)
    amax = fp8.abs_max(x, None if scaling == "tensorwise" else axis)
    given, own = quantize_fp8(x, axis, E4M3, scaling, amax_of_x=amax), quantize_fp8(x, axis, E4M3, scaling)
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(given, own))
    with pytest.raises(ValueError, match=rf"amax_of_x must be float32 \[.*\] \({scaling} scaling, axis {axis}\)"):
        quantize_fp8(x, axis, E4M3, scaling, amax_of_x=amax.t() if scaling == "rowwise" else amax.view(1))


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_zeros_get_a_finite_scale_and_quantize_to_zero(scaling):
    x = torch.zeros(4, 32)
    x[1] = torch.randn(32) if scaling == "rowwise" else 0.0
    q, scale = quantize_fp8(x, 1, scaling=scaling)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert not q.float()[[0, 2, 3]].any()
    empty_q, empty_scale = quantize_fp8(torch.zeros(0, 32), 0, scaling=scaling)  # a micro-batch without tokens
    assert empty_q.shape == (0, 32) and torch.isfinite(empty_scale).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_gets_an_infinite_scale(bad):
    x = torch.randn(3, 32)
    x[1, 4] = bad
    q, scale = quantize_fp8(x, 1)
    assert scale[1].item() == float("inf") and torch.isfinite(scale[[0, 2]]).all()
    assert not torch.isfinite(q.float()[1, 4]) and not q.float()[1, torch.arange(32) != 4].any()
    assert torch.isinf(quantize_fp8(x, 1, scaling="tensorwise")[1]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_non_finite_input_or_weight_gives_non_finite_output(scaling, bad):
    """Never a silently finite result: row-wise, only the rows that saw the value; tensor-wise, the
    whole output (one scale covers it)."""
    linear, x, _ = make_case((6,), bias=False)
    qt.quantize_(linear, "fp8_mixed_precision", scaling=scaling, filter_fn=lambda m, n: True)
    x[2, 5] = bad
    out = linear(x)
    assert not torch.isfinite(out[2]).all()
    others = out[[0, 1, 3, 4, 5]]
    assert torch.isfinite(others).all() if scaling == "rowwise" else not torch.isfinite(others).any()
    x[2, 5] = 0.0
    with torch.no_grad():
        linear.weight[7, 3] = bad
    assert not torch.isfinite(linear(x)[:, 7]).any()


scaled_mm_on_cpu = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_scaled_mm", "CPU"),
    reason="this torch has no CPU torch._scaled_mm")


@scaled_mm_on_cpu
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("left_dtype", [E4M3, E5M2])
def test_the_kernel_path_gives_the_emulations_numbers(scaling, left_dtype):
    """The torch._scaled_mm call (run here by torch's CPU implementation) with K and N padded to multiples of
    16, the right operand made column-major, and row-wise products in bfloat16: the emulation's numbers."""
    torch.manual_seed(0)
    a, a_scale = quantize_fp8(torch.randn(33, 40), 1, left_dtype, scaling)
    b, b_scale = quantize_fp8(torch.randn(40, 24), 0, E4M3, scaling)
    b = b.contiguous()  # row-major: the kernel path must lay it out for the kernel
    kernel = fp8._scaled_mm(a, b, a_scale, b_scale, torch.float32, fast_accumulation=False)
    emulated = fp8._emulated_scaled_mm(a, b, a_scale, b_scale, torch.float32)
    assert kernel.shape == (33, 24) and kernel.dtype == torch.float32
    # Rowwise goes through bfloat16: 8 bits of mantissa.
    assert rel_err(kernel, emulated) < (2**-8 if scaling == "rowwise" else 1e-6)


def test_fp8_matmul_choice_and_its_errors(monkeypatch):
    a, a_scale = quantize_fp8(torch.randn(4, 32), 1)
    b, b_scale = quantize_fp8(torch.randn(32, 16), 0)
    emulated = scaled_fp8_mm(a, b, a_scale, b_scale, torch.float32)
    monkeypatch.setenv("QT_FP8_MATMUL", "emulated")
    assert torch.equal(scaled_fp8_mm(a, b, a_scale, b_scale, torch.float32), emulated)
    monkeypatch.setenv("QT_FP8_MATMUL", "scaled_mm")
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU of compute capability 8\.9 or newer, not the CPU; "
                                           "unset it to emulate"):
        scaled_fp8_mm(a, b, a_scale, b_scale, torch.float32)
    # A GPU without FP8 tensor cores is refused only when the kernel is forced (a CPU weight may still move).
    monkeypatch.setattr(fp8, "_capability", lambda device: (8, 0))
    assert "cuda:0 (compute capability 8.0)" in fp8.fp8_kernel_unavailable(torch.device("cuda", 0))
    assert qt.Fp8MixedPrecisionConfig().incompatibility(torch.nn.Linear(4, 4)) is None
    monkeypatch.setenv("QT_FP8_MATMUL", "auto")
    assert fp8.fp8_kernel_unavailable(torch.device("cuda", 0)) is None
    monkeypatch.setenv("QT_FP8_MATMUL", "fast")
    with pytest.raises(ValueError, match="QT_FP8_MATMUL='fast': use one of auto, scaled_mm, emulated"):
        scaled_fp8_mm(a, b, a_scale, b_scale, torch.float32)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"scaling": "blockwise"}, ValueError, "option scaling='blockwise': use one of rowwise, tensorwise"),
    ({"grad_dtype": "e3m4"}, ValueError, "option grad_dtype='e3m4': use one of auto, e4m3, e5m2"),
    ({"power_of_two_scales": 1}, TypeError, "option power_of_two_scales=1 must be a bool"),
    ({"grad_weight_hp": True}, TypeError, "has no option 'grad_weight_hp'; its options are: scaling, grad_dtype"),
])
def test_bad_options_are_one_line_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        qt.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 4)), "fp8_mixed_precision", **kwargs)


def test_the_cli_takes_the_recipe_and_reports_its_bad_options(tmp_path, capsys):
    def error_of(*flags):
        with pytest.raises(SystemExit):
            llm_pretrain.main(["--run_dir", str(tmp_path / "run"), "--dataset_dir", str(tmp_path), *flags])
        return capsys.readouterr().err.strip()

    assert "or one of: int8_weight_only, int8_mixed_precision, fp8_mixed_precision, bitnet" in error_of(
        "--quantize", "fp8")
    assert error_of("--quantize", "fp8_mixed_precision", "--quantize_kwargs", '{"scaling": "blockwise"}') == (
        "error: --quantize fp8_mixed_precision --quantize_kwargs '{\"scaling\": \"blockwise\"}': recipe "
        "'fp8_mixed_precision' option scaling='blockwise': use one of rowwise, tensorwise")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # compiles (about 10 s here)
def test_compiled_fullgraph_matches_eager():
    """Both scalings in one compiled model (a compile costs ~25 s here): no graph break (fullgraph), and the
    eager numbers. In float32: in bfloat16, fusion keeps some intermediates in float32 where eager rounds them
    (2^-9), which flips FP8 codes (2^-4 apart) downstream and moves the first layer's gradient by ~4%; float32
    leaves only the summation order (measured: 4e-7)."""
    from tests.test_compile import loss_and_grads

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32))
    for index, scaling in (("0", "tensorwise"), ("2", "rowwise")):
        qt.quantize_(model, "fp8_mixed_precision", scaling=scaling, filter_fn=lambda m, name, i=index: name == i)
    x = torch.randn(40, 64)
    eager_loss, eager_grads = loss_and_grads(model, model, x)
    torch._dynamo.reset()
    compiled_loss, compiled_grads = loss_and_grads(model, torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        assert rel_err(compiled_grad, eager_grad) < 1e-5
