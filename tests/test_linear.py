"""qt/linear.py: the plan-driven core gives, bit for bit, what each recipe's matmuls computed when each
recipe had its own autograd function (written out here from the kernels), and refuses plans it cannot run."""

import pytest
import torch

import qt
from qt.kernels import quantize_fp8, quantize_int8, quantize_int8_rows_and_cols, scaled_fp8_mm, scaled_int8_mm
from qt.kernels.fp8 import E4M3, E5M2
from qt.linear import HIGH_PRECISION, LinearPlan, MatmulPlan
from tests.kernels.backends import through
from tests.recipes.linear_harness import make_case, run_linear
from tests.reference import sqnr_db


def int8_matmul(a, b):
    """`a @ b` as the recipes wrote it: a scaled per row, b per column."""
    a_q, a_scale = quantize_int8(a, 1)
    b_q, b_scale = quantize_int8(b, 0)
    return scaled_int8_mm(a_q, b_q, a_scale, b_scale)


def separate_mixed_precision(w, x, dy, output, grad_input, grad_weight):
    out = int8_matmul(x, w.T) if output else x @ w.T
    grad_x = int8_matmul(dy, w) if grad_input else dy @ w
    grad_w = int8_matmul(dy.T, x) if grad_weight else dy.T @ x
    return out, grad_x, grad_w


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("flags", [(True, True, True), (True, False, True), (False, True, False), (True, True, False)])
def test_int8_mixed_precision_is_bit_exact_with_its_matmuls_written_separately(backend, flags):
    linear, x, dy = make_case((33,), bias=False, in_features=48, out_features=40)
    w = linear.weight.detach().clone()
    expected = through(backend, separate_mixed_precision)(w, x, dy, *flags)
    output, grad_input, grad_weight = flags
    # X by columns for grad_weight (grad_weight from X's codes: test_grad_weight_from_the_forwards_codes_is_...).
    qt.quantize_(linear, "int8_mixed_precision", output=output, grad_input=grad_input, grad_weight=grad_weight,
                 grad_weight_sees_quantized_input=False, filter_fn=lambda m, n: True)
    got = through(backend, run_linear)(linear, x, dy)[:3]
    for name, a, b in zip(("output", "grad_input", "grad_weight"), got, expected):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bitnet_high_precision_backward_is_bit_exact_with_the_written_out_math(backend):
    """int8_backward=False: the forward's INT8 matmul, the backward's two in the compute dtype."""
    from qt.recipes.bitnet import ternarize

    linear, x, dy = make_case((33,), bias=False, in_features=48, out_features=40)
    ternary, w_scale = ternarize(linear.weight.detach())

    def written_out():
        x_q, x_scale = quantize_int8(x, 1)
        return scaled_int8_mm(x_q, ternary.T, x_scale, w_scale), dy.T @ (x_q.float() * x_scale)

    out, grad_w = through(backend, written_out)()
    qt.quantize_(linear, "bitnet", int8_backward=False, filter_fn=lambda m, n: True)
    got_out, got_gx, got_gw, _ = through(backend, run_linear)(linear, x, dy)
    assert torch.equal(got_out, out) and torch.equal(got_gw, grad_w)
    torch.testing.assert_close(got_gx, dy @ (ternary.float() * w_scale))  # the scale now multiplies W first


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bitnet_default_int8_backward_is_bit_exact_with_the_written_out_math(backend):
    """The default (int8_backward): dY both ways in one op (its columns with X's per-token scales folded in),
    grad_input against W's ternary codes, grad_weight against X's codes from the forward."""
    from qt.recipes.bitnet import ternarize

    linear, x, dy = make_case((33,), bias=False, in_features=48, out_features=40)
    ternary, w_scale = ternarize(linear.weight.detach())

    def written_out():
        x_q, x_scale = quantize_int8(x, 1)
        dy_rows, dy_row_scale, dy_cols, dy_col_scale = quantize_int8_rows_and_cols(dy, col_row_multipliers=x_scale)
        return (scaled_int8_mm(x_q, ternary.T, x_scale, w_scale),
                scaled_int8_mm(dy_rows, ternary.t().contiguous().t(), dy_row_scale, w_scale),
                scaled_int8_mm(dy_cols.T, x_q.t().contiguous().t(), dy_col_scale.T, x_scale.new_ones(1, x.shape[1])))

    expected = through(backend, written_out)()
    qt.quantize_(linear, "bitnet", filter_fn=lambda m, n: True)
    got = through(backend, run_linear)(linear, x, dy)[:3]
    for name, a, b in zip(("output", "grad_input", "grad_weight"), got, expected):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("int8_activations", [False, True])
def test_int8_weight_only_is_bit_exact_with_the_written_out_math(int8_activations):
    linear, x, dy = make_case((33,), bias=False, in_features=48, out_features=40)
    qt.quantize_(linear, "int8_weight_only", int8_activations=int8_activations, filter_fn=lambda m, n: True)
    weight = linear.weight
    w = weight.dequantize()
    if int8_activations:
        x_q, x_scale = quantize_int8(x, 1)
        out = scaled_int8_mm(x_q, weight.int_data.T, x_scale, weight.scale.T)
    else:
        out = x @ w.T
    got_out, got_gx, got_gw, _ = run_linear(linear, x, dy)
    assert torch.equal(got_out, out) and torch.equal(got_gx, dy @ w) and torch.equal(got_gw, dy.T @ x)


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_fp8_mixed_precision_is_bit_exact_with_its_matmuls_written_out(scaling):
    """X, W in E4M3, dY in E5M2 (tensorwise's default) or E4M3 (rowwise's), each scaled along the kept dimension, X
    quantized by columns for grad_weight (row-wise, the default reads X's codes: the test after the next)."""
    linear, x, dy = make_case((33,), bias=False, in_features=48, out_features=40)
    w = linear.weight.detach().clone()
    dy_dtype = E5M2 if scaling == "tensorwise" else E4M3

    def fp8_matmul(a, b, a_dtype=E4M3):
        a_q, a_scale = quantize_fp8(a, 1, a_dtype, scaling)
        b_q, b_scale = quantize_fp8(b, 0, E4M3, scaling)
        return scaled_fp8_mm(a_q, b_q, a_scale, b_scale, torch.float32)

    expected = fp8_matmul(x, w.T), fp8_matmul(dy, w, dy_dtype), fp8_matmul(dy.T.contiguous(), x, dy_dtype)
    qt.quantize_(linear, "fp8_mixed_precision", scaling=scaling, grad_weight_sees_quantized_input=False,
                 filter_fn=lambda m, n: True)
    got = run_linear(linear, x, dy)[:3]
    for name, a, b in zip(("output", "grad_input", "grad_weight"), got, expected):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("codes", [False, True])
def test_fp8_rowwise_gradients_are_the_same_through_the_abs_max_kernel(codes):
    """dY's row- and column-wise FP8 casts take their abs-maxima from qt's tile kernel on a GPU (here the interpreter)
    and from torch ops elsewhere: the same bits either way, X's scales folded into dY's columns included."""
    results = []
    for backend in ("triton", "torch"):
        linear, x, dy = make_case((3, 11), bias=True, in_features=48, out_features=40)
        qt.quantize_(linear, "fp8_mixed_precision", scaling="rowwise", grad_weight_sees_quantized_input=codes,
                     filter_fn=lambda m, n: True)
        results.append(through(backend, run_linear)(linear, x, dy))
    for name, a, b in zip(("output", "grad_input", "grad_weight", "grad_bias"), *results):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(("scaling", "passes"), [("tensorwise", 3), ("rowwise", 5)])
def test_fp8_tensorwise_takes_each_abs_max_once(scaling, passes, monkeypatch):
    """Tensor-wise, X's abs-max serves the forward and grad_weight, W's the forward and grad_input, and dY is cast
    once for both backward matmuls: the abs-max passes of one forward + backward are X, W and dY once each.
    Row-wise: X by rows (grad_weight reads its codes), W and dY by rows and by columns."""
    import qt.kernels.fp8 as fp8
    import qt.kernels.quantize
    import qt.linear

    calls = []

    def counted(x, axis):
        calls.append(tuple(x.shape))
        return abs_max(x, axis)

    abs_max = fp8.abs_max
    monkeypatch.setattr(fp8, "abs_max", counted)
    monkeypatch.setattr(qt.linear, "abs_max", counted)
    monkeypatch.setattr(qt.kernels.quantize, "abs_max", counted)  # dY's row-wise maxima, on the CPU
    linear, x, dy = make_case((33,), bias=False, in_features=48, out_features=40)
    qt.quantize_(linear, "fp8_mixed_precision", scaling=scaling, filter_fn=lambda m, n: True)
    run_linear(linear, x, dy)
    assert len(calls) == passes, calls


@pytest.mark.parametrize(("make", "message"), [
    (lambda: MatmulPlan("fp4"), "format 'fp4'"),
    (lambda: MatmulPlan(None, stochastic_rounding=True), "needs a quantized format"),
    (lambda: MatmulPlan("fp8", stochastic_rounding=True), "is implemented for INT8"),
    (lambda: MatmulPlan("int8", scaling="tensorwise", power_of_two_scales=True),
     "scaling, power_of_two_scales needs format 'fp8'"),
    (lambda: MatmulPlan("fp8", scaling="blockwise"), "scaling 'blockwise'"),
    (lambda: MatmulPlan("fp8", grad_dtype=torch.bfloat16), "grad_dtype torch.bfloat16"),
    (lambda: MatmulPlan("fp8", k_block_scales=True), "k_block_scales is implemented for INT8"),
    (lambda: LinearPlan(grad_input=MatmulPlan("int8", k_block_scales=True)), "k_block_scales is for grad_weight"),
    (lambda: LinearPlan(output=MatmulPlan("fp8", grad_dtype=E5M2)), "output matmul has no gradient operand"),
    (lambda: LinearPlan(grad_weight_sees_quantized_input=True), "needs a quantized output"),
    (lambda: LinearPlan(MatmulPlan("fp8", scaling="rowwise"), HIGH_PRECISION, HIGH_PRECISION,
                        grad_weight_sees_quantized_input=True), r"high-precision grad_weight \(INT8 output\)"),
    (lambda: LinearPlan(MatmulPlan("int8"), HIGH_PRECISION, MatmulPlan("fp8", scaling="rowwise"),
                        grad_weight_sees_quantized_input=True), "a grad_weight of the output's format"),
    (lambda: LinearPlan(MatmulPlan("fp8", scaling="tensorwise"), HIGH_PRECISION,
                        MatmulPlan("fp8", scaling="tensorwise", power_of_two_scales=True),
                        grad_weight_sees_quantized_input=True), "both FP8 tensor-wise alike"),
    (lambda: LinearPlan(MatmulPlan("fp8", scaling="tensorwise"), HIGH_PRECISION, MatmulPlan("fp8", scaling="rowwise"),
                        grad_weight_sees_quantized_input=True), "both scaled row-wise"),
])
def test_plans_that_cannot_run_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def grad_weight_from_the_forwards_codes(recipe, dy, x, backend="torch", grad_input=True):
    """grad_weight written out from X's codes as the forward quantized them, X's per-token scales folded into dY
    before dY's column-wise quantization (LinearPlan.grad_weight_sees_quantized_input with a quantized grad_weight)."""
    def written_out():
        if recipe == "int8_mixed_precision":
            x_q, x_scale = quantize_int8(x, 1)
            if grad_input:  # dY both ways in one op
                _, _, dy_q, dy_scale = quantize_int8_rows_and_cols(dy, col_row_multipliers=x_scale)
            else:
                dy_q, dy_scale = quantize_int8(dy, 0, row_multipliers=x_scale)
            return scaled_int8_mm(dy_q.T, x_q.t().contiguous().t(), dy_scale.T, x_scale.new_ones(1, x.shape[1]))
        x_q, x_scale = quantize_fp8(x, 1, E4M3, "rowwise")
        dy_q, dy_scale = quantize_fp8(dy * x_scale, 0, E4M3, "rowwise")
        return scaled_fp8_mm(dy_q.T, x_q.t().contiguous().t(), dy_scale.T, x_scale.new_ones(1, x.shape[1]),
                             torch.float32)
    return through(backend, written_out)()


QUANTIZED_INPUT_CASES = [("int8_mixed_precision", {}, "torch"), ("int8_mixed_precision", {}, "triton"),
                         ("int8_mixed_precision", {"grad_input": False}, "triton"),
                         ("fp8_mixed_precision", {"scaling": "rowwise"}, "torch"),
                         ("fp8_mixed_precision", {"scaling": "rowwise"}, "triton")]


@pytest.mark.parametrize(("recipe", "options", "backend"), QUANTIZED_INPUT_CASES,
                         ids=[f"{r}-{o}-{b}" for r, o, b in QUANTIZED_INPUT_CASES])
def test_grad_weight_from_the_forwards_codes_is_the_written_out_math(recipe, options, backend):
    """The output and grad_input are those of the recipe without the option bit for bit; grad_weight is the
    written-out math."""
    linear, x, dy = make_case((33,), bias=False, in_features=48, out_features=40)
    default = __import__("copy").deepcopy(linear)
    qt.quantize_(default, recipe, **options, grad_weight_sees_quantized_input=False, filter_fn=lambda m, n: True)
    qt.quantize_(linear, recipe, **options, grad_weight_sees_quantized_input=True, filter_fn=lambda m, n: True)
    got_out, got_gx, got_gw, _ = through(backend, run_linear)(linear, x, dy)
    out, gx, _, _ = through(backend, run_linear)(default, x, dy)
    assert torch.equal(got_out, out) and torch.equal(got_gx, gx)
    assert torch.equal(got_gw, grad_weight_from_the_forwards_codes(recipe, dy, x, backend,
                                                                   options.get("grad_input", True)))


def activations_and_gradients(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, dy = torch.randn(512, 96), torch.randn(512, 64)
    if kind == "tokens of unequal size":  # across two decades, dY the other way, and one outlier channel
        x, dy = x * torch.logspace(-1, 1, 512)[:, None], dy * torch.logspace(1, -1, 512)[:, None]
        x[:, 5] *= 20
    if kind == "outlier channels":
        x[:, 5] *= 50
        x[:, 17] *= 20
    return x, dy


@pytest.mark.parametrize(("recipe", "options"), [("int8_mixed_precision", {}),
                                                 ("fp8_mixed_precision", {"scaling": "rowwise"})])
@pytest.mark.parametrize("kind", ["iid", "tokens of unequal size", "outlier channels"])
def test_grad_weight_from_the_forwards_codes_against_the_exact_gradient(recipe, options, kind):
    """SQNR of grad_weight against dY.T @ X in float64, from X's codes (per-token scales) and by default (X quantized
    per channel over the tokens). A trade-off for INT8, measured here (dB, default -> codes): iid 39.4 -> 39.7;
    tokens of unequal size 13.2 -> 29.9 (a column's scale then follows its largest token); outlier channels 37.9 ->
    31.3 (the per-token scales follow the outlier channels, as the forward's do). FP8's three agree within 1.2 dB."""
    x, dy = activations_and_gradients(kind)
    exact = dy.double().T @ x.double()
    sqnr = {}
    for sees_codes in (False, True):
        linear = torch.nn.Linear(x.shape[1], dy.shape[1], bias=False)
        qt.quantize_(linear, recipe, **options, grad_weight_sees_quantized_input=sees_codes, filter_fn=lambda m, n: True)
        sqnr[sees_codes] = sqnr_db(run_linear(linear, x, dy)[2].double(), exact)
    assert sqnr[True] > 28, sqnr
    if kind == "iid" or recipe == "fp8_mixed_precision":
        assert abs(sqnr[True] - sqnr[False]) < 1.5, sqnr
    elif kind == "tokens of unequal size":
        assert sqnr[True] > sqnr[False] + 10, sqnr
    else:
        assert sqnr[True] < sqnr[False] - 3, sqnr


def test_grad_weight_from_the_forwards_codes_needs_what_it_reads():
    with pytest.raises(ValueError, match="option grad_weight_sees_quantized_input=True uses what the forward"):
        qt.resolve_recipe("int8_mixed_precision", output=False, grad_weight_sees_quantized_input=True)
    with pytest.raises(ValueError, match="needs output=True and grad_weight=True"):
        qt.resolve_recipe("fp8_mixed_precision", grad_weight=False, grad_weight_sees_quantized_input=True)


def test_grad_weight_from_the_forwards_codes_is_unbiased_with_stochastic_rounding():
    """With stochastic rounding, X's codes (forward) and s * dY's (backward) round independently and without bias,
    so their product's mean over draws is dY.T @ X."""
    torch.manual_seed(0)
    x, dy = torch.randn(64, 24), torch.randn(64, 16)
    linear = torch.nn.Linear(24, 16, bias=False)
    qt.quantize_(linear, "int8_mixed_precision", stochastic_rounding=True, grad_weight_sees_quantized_input=True,
                 filter_fn=lambda m, n: True)
    draws = []
    for _ in range(400):
        linear.weight.grad = None
        draws.append(run_linear(linear, x, dy)[2])
    exact = dy.double().T @ x.double()
    one, mean = sqnr_db(draws[0].double(), exact), sqnr_db(torch.stack(draws).mean(0).double(), exact)
    assert mean > one + 20, (one, mean)  # 400 draws: the noise falls by 26 dB, a bias would not


def test_fp8_tensorwise_grad_weight_from_the_forwards_codes_gives_the_default_numbers():
    """Tensor-wise, the forward's codes of X are what casting X again with its saved abs-max gives: the same three
    results bit for bit, with a transpose of the codes in place of a second cast of X."""
    linear, x, dy = make_case((33,), bias=False, in_features=48, out_features=40)
    default = __import__("copy").deepcopy(linear)
    qt.quantize_(default, "fp8_mixed_precision", filter_fn=lambda m, n: True)
    qt.quantize_(linear, "fp8_mixed_precision", grad_weight_sees_quantized_input=True, filter_fn=lambda m, n: True)
    for name, a, b in zip(("output", "grad_input", "grad_weight"), run_linear(linear, x, dy)[:3],
                          run_linear(default, x, dy)[:3]):
        assert torch.equal(a, b), name


TOKEN_BLOCK_RECIPES = [("int8_mixed_precision", {}), ("int8_mixed_precision", {"grad_input": False}),
                       ("bitnet", {})]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("recipe", "options"), TOKEN_BLOCK_RECIPES, ids=["int8_mp", "int8_mp_no_grad_input", "bitnet"])
def test_grad_weight_token_blocks_is_the_written_out_math(backend, recipe, options):
    """The output and grad_input are the recipe's without the option, bit for bit; grad_weight scales (s * dY)'s
    columns per 128 tokens (300 tokens: two whole blocks and a partial one) against X's codes."""
    linear, x, dy = make_case((300,), bias=False, in_features=48, out_features=40)
    default = __import__("copy").deepcopy(linear)
    qt.quantize_(default, recipe, **options, filter_fn=lambda m, n: True)
    qt.quantize_(linear, recipe, **options, grad_weight_token_blocks=True, filter_fn=lambda m, n: True)

    def written_out():
        x_q, x_scale = quantize_int8(x, 1)
        dy_q, dy_scale = quantize_int8(dy, 0, row_multipliers=x_scale, k_blocks=True)
        assert dy_scale.shape == (3, 40)
        return scaled_int8_mm(dy_q.T, x_q.t().contiguous().t(), dy_scale.T, x_scale.new_ones(1, x.shape[1]))

    got_out, got_gx, got_gw, _ = through(backend, run_linear)(linear, x, dy)
    out, gx, _, _ = through(backend, run_linear)(default, x, dy)
    assert torch.equal(got_out, out) and (got_gx is None if gx is None else torch.equal(got_gx, gx))
    assert torch.equal(got_gw, through(backend, written_out)())


@pytest.mark.parametrize("kind", ["iid", "gradients spanning two decades over the tokens"])
def test_grad_weight_token_blocks_against_the_exact_gradient(kind):
    """SQNR of grad_weight against dY.T @ X in float64 over 512 tokens (four blocks), with one scale per output
    feature over all tokens and per 128 tokens (dB, all -> blocks): iid 39.7 -> 40.5; dY's tokens spanning two
    decades 34.8 -> 39.2, each block's scale then following its own largest tokens."""
    torch.manual_seed(0)
    x, dy = torch.randn(512, 96), torch.randn(512, 64)
    if kind != "iid":
        dy *= torch.logspace(1, -1, 512)[:, None]
    exact = dy.double().T @ x.double()
    sqnr = {}
    for token_blocks in (False, True):
        linear = torch.nn.Linear(x.shape[1], dy.shape[1], bias=False)
        qt.quantize_(linear, "int8_mixed_precision", grad_weight_token_blocks=token_blocks,
                     filter_fn=lambda m, n: True)
        sqnr[token_blocks] = sqnr_db(run_linear(linear, x, dy)[2].double(), exact)
    assert sqnr[True] > sqnr[False] + (3 if kind != "iid" else 0), sqnr


@pytest.mark.parametrize(("recipe", "options", "message"), [
    ("int8_mixed_precision", {"grad_weight": False}, "needs grad_weight=True"),
    ("bitnet", {"int8_backward": False}, "needs int8_backward=True"),
])
def test_grad_weight_token_blocks_needs_an_int8_grad_weight(recipe, options, message):
    with pytest.raises(ValueError, match=message):
        qt.resolve_recipe(recipe, **options, grad_weight_token_blocks=True)
