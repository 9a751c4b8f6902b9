"""QT_KERNEL_BACKEND, and the recipes run end to end through the Triton kernels (interpreted)."""

import os
import re

import pytest
import torch

import qt
from tests.kernels import inductor_for_a_gpu
from tests.recipes.linear_harness import make_case, run_linear


@pytest.mark.parametrize(
    "recipe, kwargs",
    [("int8_weight_only", {"int8_activations": True}), ("int8_mixed_precision", {}), ("bitnet", {})],
)
def test_recipes_give_the_same_numbers_through_triton_and_torch(recipe, kwargs, monkeypatch):
    from qt.kernels import int8_mm, quantize

    launches = []
    launchers = [(quantize, "_triton_quantize_whole_rows"), (quantize, "_triton_tile_quantize"),
                 (int8_mm, "_triton_scaled_int8_mm")]
    for module, name in launchers:
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, kernel=kernel, name=name, **kw: launches.append(name) or kernel(*a, **kw))
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("QT_KERNEL_BACKEND", backend)
        linear, x, dy = make_case((3, 17), bias=True, in_features=40, out_features=24)
        qt.quantize_(linear, recipe, filter_fn=lambda m, n: True, **kwargs)
        results[backend] = run_linear(linear, x, dy)
    assert "_triton_scaled_int8_mm" in launches and {"_triton_quantize_whole_rows", "_triton_tile_quantize"} & set(launches)
    for from_triton, from_torch in zip(results["triton"], results["torch"]):
        # Same integer math; the epilogues may round the fp32 products differently by an ulp.
        torch.testing.assert_close(from_triton, from_torch, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "expected"), [
    # By default X's codes serve grad_weight, copied column-major: X by rows alone; W and dY by rows keeping their
    # columns' abs-maxima, then by columns in one pass (dY's with X's scales folded in): no abs-max pass.
    ({}, {"_triton_quantize_whole_rows": 3, "_triton_tile_quantize": 2, "_to_column_major": 1}),
    # X too by rows keeping its columns' abs-maxima, and by columns for grad_weight.
    ({"grad_weight_sees_quantized_input": False}, {"_triton_quantize_whole_rows": 3, "_triton_tile_quantize": 3}),
    # X and W 8200 wide: past 8192 columns the tiles take their rows, the abs-max pass keeping the columns' maxima
    # for later; dY (24 wide) in whole rows.
    ({"wide": True, "grad_weight_sees_quantized_input": False},
     {"_triton_tile_amax": 2, "_triton_tile_quantize": 5, "_triton_quantize_whole_rows": 1}),
])
def test_an_int8_linear_takes_each_abs_max_once(kwargs, expected, monkeypatch):
    """int8_mixed_precision's forward and backward launch exactly these passes (each reads its input once): each
    operand's column abs-maxima are taken once, with its row-wise quantization (in the whole-row pass up to 8192
    columns, in the tiles' abs-max pass beyond), and its later column-wise pass reuses them."""
    from qt.kernels import layout, quantize

    kwargs = dict(kwargs)
    in_features = 8200 if kwargs.pop("wide", False) else 40
    launches = {}
    for module, name in ((quantize, "_triton_quantize_whole_rows"), (quantize, "_triton_tile_amax"),
                         (quantize, "_triton_tile_quantize"), (layout, "_to_column_major")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, kernel=kernel, name=name, **kw: launches.update(
            {name: launches.get(name, 0) + 1}) or kernel(*a, **kw))
    monkeypatch.setenv("QT_KERNEL_BACKEND", "triton")
    linear, x, dy = make_case((3,), bias=False, in_features=in_features, out_features=24)
    qt.quantize_(linear, "int8_mixed_precision", filter_fn=lambda m, n: True, **kwargs)
    run_linear(linear, x, dy)
    assert launches == expected


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("QT_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="QT_KERNEL_BACKEND='cuda': use one of auto, triton, torch"):
        qt.kernels.quantize_int8(torch.randn(4, 4), 1)


def compiled_matches_eager(before_compiling=lambda: None):
    """An int8_mixed_precision linear compiled gives the numbers of the eager one run through the (interpreted)
    Triton kernels; `before_compiling` runs between the two."""
    linear, x, dy = make_case((32,), bias=False, in_features=64, out_features=32)
    qt.quantize_(linear, "int8_mixed_precision", filter_fn=lambda m, n: True)
    eager = run_linear(linear, x, dy)
    linear.weight.grad = None
    torch._dynamo.reset()
    before_compiling()
    compiled = run_linear(torch.compile(linear, fullgraph=True), x, dy)
    for from_compiled, from_eager in zip(compiled[:3], eager[:3]):
        torch.testing.assert_close(from_compiled, from_eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiles (about 10 s here)
def test_compiled_recipe_through_triton_matches_eager(monkeypatch):
    """(Compiled on CPU, the kernels' torch ops run: the interpreter cannot be traced.)"""
    monkeypatch.setenv("QT_KERNEL_BACKEND", "triton")
    compiled_matches_eager()


def test_fake_tensors_go_through_the_custom_op():
    """Dynamo may run a whole linear on fake tensors; a Triton launch cannot read them, so the
    kernels must then call their custom op (whose fake implementation gives the shapes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qt.kernels.backend import traced

    real = torch.randn(4, 4)
    assert not traced(real)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real)
        assert traced(fake)
        q, scale = qt.kernels.quantize_int8(fake, 0)
        assert q.stride() == (1, 4) and scale.shape == (1, 4)


def test_quantize_written_for_inductor_matches_eager(monkeypatch):
    """QT_COMPILED_QUANTIZE=inductor: the compiled forward and backward quantize in torch ops, never through qt's
    quantize ops (whose implementation asks `use_triton` which path to take)."""
    from qt.kernels import quantize

    monkeypatch.setenv("QT_KERNEL_BACKEND", "triton")  # eager runs the (interpreted) kernels
    monkeypatch.setenv("QT_COMPILED_QUANTIZE", "inductor")
    op_calls = []
    use_triton = quantize.use_triton
    compiled_matches_eager(lambda: monkeypatch.setattr(
        quantize, "use_triton", lambda *a: op_calls.append(a) or use_triton(*a)))
    assert not op_calls


def test_unknown_compiled_quantize_choice_is_refused(monkeypatch):
    monkeypatch.setenv("QT_COMPILED_QUANTIZE", "triton")
    with pytest.raises(ValueError, match="use one of rows, kernel, inductor"):
        qt.kernels.quantize_int8(torch.randn(4, 4), 1)
    with pytest.raises(ValueError, match="use one of rows, kernel, inductor"):
        qt.kernels.quantize.quantize_inductor_options()


def test_inductor_options_ask_for_multi_kernel_reductions_where_inductor_quantizes(monkeypatch):
    quantized = qt.quantize_(torch.nn.Linear(16, 16), "int8_mixed_precision", filter_fn=lambda module, name: True)
    assert qt.inductor_options(quantized) == {"triton.multi_kernel": 1}  # the default, rows
    assert qt.inductor_options(torch.nn.Linear(16, 16)) == {}
    monkeypatch.setenv("QT_COMPILED_QUANTIZE", "kernel")
    assert qt.inductor_options(quantized) == {}


def test_a_multi_kernel_setting_of_the_users_stands(monkeypatch):
    """TORCHINDUCTOR_MULTI_KERNEL, set (0: off, 2 / 3: one form forced), replaces qt's request for timed
    multi-kernels; Inductor's config reads it."""
    from qt.kernels.quantize import MULTI_KERNEL_VARIABLE

    quantized = qt.quantize_(torch.nn.Linear(16, 16), "int8_mixed_precision", filter_fn=lambda module, name: True)
    monkeypatch.delenv(MULTI_KERNEL_VARIABLE, raising=False)
    assert qt.inductor_options(quantized) == {"triton.multi_kernel": 1}
    for setting in ("0", "2"):
        monkeypatch.setenv(MULTI_KERNEL_VARIABLE, setting)
        assert qt.inductor_options(quantized) == {}


def test_multi_kernel_reductions_come_without_their_cache_of_picked_kernels(monkeypatch):
    """That cache fails a compile that loads its graph from a warm FX-graph cache (torch 2.11 on an H200,
    docs/scaling.md round 21): where qt asks for multi-kernels it turns the cache off, and leaves a user's own
    setting alone."""
    from qt.kernels.quantize import MULTI_KERNEL_CACHE_VARIABLE

    quantized = qt.quantize_(torch.nn.Linear(16, 16), "int8_mixed_precision", filter_fn=lambda module, name: True)
    monkeypatch.delenv(MULTI_KERNEL_CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("QT_COMPILED_QUANTIZE", "kernel")
    qt.inductor_options(quantized)
    assert MULTI_KERNEL_CACHE_VARIABLE not in os.environ  # no multi-kernels asked for
    monkeypatch.setenv("QT_COMPILED_QUANTIZE", "rows")
    qt.inductor_options(quantized)
    assert os.environ[MULTI_KERNEL_CACHE_VARIABLE] == "1"
    monkeypatch.setenv(MULTI_KERNEL_CACHE_VARIABLE, "0")
    qt.inductor_options(quantized)
    assert os.environ[MULTI_KERNEL_CACHE_VARIABLE] == "0"


# A SwiGLU MLP as in Llama, int8_mixed_precision: its forward compiled for a GPU.
_MLP_SCRIPT = """
import torch.nn.functional as F
import qt

class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(256, dtype=torch.bfloat16)
        self.gate, self.up = (torch.nn.Linear(256, 704, bias=False, dtype=torch.bfloat16) for _ in range(2))
        self.down = torch.nn.Linear(704, 256, bias=False, dtype=torch.bfloat16)

    def forward(self, x):
        y = self.norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))

mlp = qt.quantize_(MLP(), "int8_mixed_precision", min_shape=None)
try:
    torch.compile(mlp, options=qt.inductor_options(mlp))(torch.randn(512, 256, dtype=torch.bfloat16, requires_grad=True))
except Exception:  # the launch, with no GPU
    pass
"""


@pytest.mark.slow  # a process of its own, compiling
def test_compiled_inputs_are_quantized_inside_the_ops_producing_them(tmp_path):
    """By default (QT_COMPILED_QUANTIZE=rows) a compiled forward quantizes each linear's input in the kernel that
    computes it: gate and up share one quantization of the norm's output, and the SwiGLU product is never stored in
    BF16, only its codes. qt's row-wise kernel quantizes the three weights alone."""
    log = inductor_for_a_gpu.run(_MLP_SCRIPT, tmp_path, log_code=True).stderr
    forward = log[log.index("def call(self, args)"):log.index("Output code written")]
    assert len(re.findall(r"_quantize_whole_rows_kernel_\d+\.run\(", forward)) == 3
    allocations = re.findall(r"empty_strided_cpu\((\(\d+, \d+\)), \(\d+, 1\), torch.(\w+)\)", forward)
    assert allocations.count(("(512, 704)", "bfloat16")) == 2, allocations  # gate's and up's outputs, no product
    assert allocations.count(("(512, 256)", "int8")) == 1, allocations  # the norm's output's codes, once
    assert allocations.count(("(512, 704)", "int8")) == 1, allocations  # the product's codes


# A tensor computed from two inputs and read by the three Triton launches of two qt ops (the both-axes op's
# row-wise and column-wise passes, and a row-wise pass).
_STORES_SCRIPT = """
import sys
from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_mutation
from torch._inductor.lowering import needs_realized_inputs

if sys.argv[1] == "without":
    needs_realized_inputs.discard(triton_kernel_wrapper_mutation)

def both_axes_and_rows(a, b):
    product = a * b
    return qt.kernels.quantize.quantize_int8_rows_and_cols(product), qt.kernels.quantize.quantize_int8(product, 1)

try:
    torch.compile(both_axes_and_rows)(torch.randn(64, 32, dtype=torch.bfloat16), torch.randn(64, 32, dtype=torch.bfloat16))
except Exception:  # the launch, with no GPU
    pass
"""


@pytest.mark.slow  # a process of its own, compiling
@pytest.mark.parametrize("registration", ["with", "without"])
def test_a_tensor_read_by_several_kernels_is_stored_once(registration, tmp_path, monkeypatch):
    monkeypatch.setenv("QT_COMPILED_QUANTIZE", "kernel")  # the row-wise pass too through qt's kernel
    log = inductor_for_a_gpu.run(_STORES_SCRIPT, tmp_path, registration, log_code=True).stderr
    kernels = re.findall(r"def (triton_poi\w*)\((.*?)'''", log, re.S)
    product_stores = [body.count("tl.store") for name, body in kernels if body.count("tl.load") == 2]
    assert product_stores, f"no generated kernel computes the product; the log ends:\n{log[-3000:]}"
    if registration == "with":
        assert product_stores == [1]
    else:  # the problem the registration solves; should torch solve it itself, the registration can go
        assert product_stores == [3], "torch now stores such a tensor once by itself: see qt/kernels/backend.py"


# Every launch of qt's kernels, compiled: each op's Triton kernels, with the arguments each takes.
_EVERY_LAUNCH_SCRIPT = """
from qt.kernels import quantize_int8, quantize_int8_rows_and_cols, quantize_int8_rows_keeping_col_amax, scaled_int8_mm
from qt.kernels import to_column_major
from qt.kernels.quantize import quantize_fp8_rows_and_cols

def every_launch(x, multipliers):
    rows_q, rows_scale, col_amax = quantize_int8_rows_keeping_col_amax(x)
    cols = quantize_int8(x, 0, col_amax=col_amax)
    blocks_q, blocks_scale = quantize_int8(x, 0, row_multipliers=multipliers, k_blocks=True)
    both = quantize_int8_rows_and_cols(x, col_row_multipliers=multipliers)
    fp8 = quantize_fp8_rows_and_cols(x, torch.float8_e4m3fn, torch.float8_e5m2, False, True, multipliers)
    product = scaled_int8_mm(rows_q, to_column_major(both[0]).T, rows_scale, both[1].T)
    by_block = scaled_int8_mm(blocks_q.T, to_column_major(rows_q), blocks_scale.T, rows_scale.new_ones(1, 256))
    return cols, both, fp8, product, by_block

try:
    torch.compile(every_launch, fullgraph=True)(torch.randn(300, 256, dtype=torch.bfloat16),
                                                torch.rand(300, dtype=torch.bfloat16))
except Exception:  # the launch, with no GPU
    pass
"""


@pytest.mark.slow  # a process of its own, compiling
def test_compile_reads_what_each_kernel_writes(tmp_path):
    """torch.compile finds which tensors each of qt's Triton launches writes from the kernel's IR; where it cannot
    (e.g. an argument left to its default), it warns, takes every input as written and copies them for the kernel."""
    result = inductor_for_a_gpu.run(_EVERY_LAUNCH_SCRIPT, tmp_path, log_code=True)
    launched = set(re.findall(r"\b(_\w+_kernel)_\d+\.run\(", result.stderr))
    assert {"_quantize_whole_rows_kernel", "_tile_quantize_kernel", "_scaled_int8_mm_kernel"} <= launched, (
        result.stderr[-3000:])
    assert "assuming every input is mutated" not in result.stderr, result.stderr[-6000:]
