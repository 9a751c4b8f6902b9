"""The recipes on a GPU (skipped without one): the Triton kernels against the torch ops, and compiled
graphs that launch the Triton kernels themselves (no qt op, hence no Python, between kernels, but the one
int8_weight_only's grad_input keeps opaque and, on Hopper, the Gluon INT8 matmul of large shapes), and the Gluon
kernel's bits.

Run them with `TRITON_INTERPRET=0 pytest tests/test_cuda_recipes.py`: the test suite's conftest turns Triton's
CPU interpreter on unless told otherwise, and interpreted kernels are not what a GPU runs."""

import os
import re

import pytest
import torch
from torch import nn

import qt
from tests.kernels.backends import through
from tests.reference import rel_err

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="runs the compiled kernels: set TRITON_INTERPRET=0 (Triton's interpreter is on)"),
]

RECIPES = [("int8_mixed_precision", {}), ("int8_mixed_precision", {"stochastic_rounding": True}),
           ("int8_mixed_precision", {"grad_weight_sees_quantized_input": False}),
           ("int8_weight_only", {}), ("int8_weight_only", {"int8_activations": True}), ("bitnet", {}),
           ("bitnet", {"int8_backward": False}), ("int8_mixed_precision", {"grad_weight_token_blocks": True}),
           ("bitnet", {"grad_weight_token_blocks": True})]


def linear_case(recipe, kwargs, tokens=1000, in_features=768, out_features=640):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, device="cuda", dtype=torch.bfloat16)
    qt.quantize_(linear, recipe, filter_fn=lambda m, n: True, **kwargs)
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, out_features, device="cuda", dtype=torch.bfloat16)
    return linear, x, dy


def forward_backward(linear, x, dy):
    x = x.detach().clone().requires_grad_()
    linear.weight.grad = None
    out = linear(x)
    out.backward(dy)
    return out.detach(), x.grad, linear.weight.grad


@pytest.mark.parametrize("width", [300, 2048, 5632])
def test_quantize_kernels_keep_nan_and_inf_visible_as_the_torch_ops_do(width):
    """On the GPU the kernels' maxima come from NaN-propagating max instructions, and FP8 codes from the GPU's own cast
    (Triton's interpreter, which the CPU tests run, can tell neither from what it runs instead): a slice holding NaN or
    inf gets an infinite scale, and every result has the torch path's bits (INT8 and FP8, both FP8 formats, scales
    rounded to powers of two or not). Widths: one block of rows, the 2048-wide blocks, the pipelined wide rows."""
    from qt.kernels import quantize_int8, quantize_int8_rows_and_cols, quantize_int8_rows_keeping_col_amax
    from qt.kernels.fp8 import E4M3, E5M2
    from qt.kernels.quantize import quantize_fp8_rows_and_cols
    from tests.kernels.test_quantize import same_codes

    torch.manual_seed(0)
    x = torch.randn(4100, width, device="cuda", dtype=torch.bfloat16)
    x[1, 3], x[2000, 7], x[4099, width - 1] = float("nan"), float("inf"), -float("inf")
    multipliers = torch.rand(4100, 1, device="cuda", dtype=torch.bfloat16) + 0.5

    def results():
        return (*quantize_int8_rows_and_cols(x, False, multipliers), *quantize_int8_rows_keeping_col_amax(x),
                *quantize_fp8_rows_and_cols(x, E4M3, E5M2, False, True, multipliers),
                *quantize_fp8_rows_and_cols(x, E5M2, E4M3, True, False), *quantize_int8(x, 1), *quantize_int8(x, 0))

    kernels, reference = through("triton", results)(), through("torch", results)()
    for index, (got, want) in enumerate(zip(kernels, reference)):
        assert same_codes(got, want), f"result {index}"
    row_scale, col_scale = kernels[1], kernels[3]
    assert torch.isinf(row_scale[[1, 2000, 4099], 0]).all() and torch.isfinite(row_scale[0, 0])
    assert torch.isinf(col_scale[0, [3, 7, width - 1]]).all() and torch.isfinite(col_scale[0, 0])


@pytest.mark.parametrize(("recipe", "kwargs"), RECIPES)
def test_triton_kernels_match_torch_ops(recipe, kwargs):
    linear, x, dy = linear_case(recipe, kwargs)
    torch.manual_seed(1)
    triton = through("triton", forward_backward)(linear, x, dy)
    torch.manual_seed(1)
    reference = through("torch", forward_backward)(linear, x, dy)
    # The same integers (stochastic rounding takes the same random numbers on both paths); the bf16 outputs may
    # differ by the epilogue's last bit.
    for got, want in zip(triton, reference):
        assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize(("shape", "dtype"), [((16384, 2048), torch.bfloat16), ((1000, 5632), torch.bfloat16),
                                               ((1000, 5632), torch.float32), ((333, 9000), torch.bfloat16),
                                               ((4096, 7), torch.float32)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_kernels_give_the_torch_ops_bits(shape, dtype, stochastic):
    """Every INT8 quantize entry point (whole-row passes, the tiles' passes past 8192 columns, the column-wise abs-max
    folded into the row-wise pass, and rows multiplied for the columns) bit for bit against its torch ops, rounding
    to nearest or stochastically (the same seeds from torch's generator, the same hash of them)."""
    from qt.kernels import quantize_int8, quantize_int8_rows_and_cols, quantize_int8_rows_keeping_col_amax

    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda") * torch.logspace(-3, 3, shape[1], device="cuda")
    x = x.to(dtype)
    multipliers = torch.rand(shape[0], device="cuda", dtype=dtype) + 0.5

    def every_result():
        torch.manual_seed(1)
        kept = quantize_int8_rows_keeping_col_amax(x, stochastic)
        return (*quantize_int8(x, 1, stochastic), *quantize_int8(x, 0, stochastic), *kept,
                *quantize_int8(x, 0, stochastic, col_amax=kept[2]), *quantize_int8_rows_and_cols(x, stochastic),
                *quantize_int8_rows_and_cols(x, stochastic, col_row_multipliers=multipliers),
                *quantize_int8(x, 0, stochastic, multipliers, k_blocks=True))

    for got, want in zip(through("triton", every_result)(), through("torch", every_result)()):
        assert got.stride() == want.stride() and torch.equal(got, want)


@pytest.mark.parametrize("shape", [(2048, 5632, 16384), (640, 768, 1000), (5, 9, 130)])
@pytest.mark.parametrize("kernel", ["auto", "tma", "classic"])
def test_scales_per_block_of_k_in_each_kernel(shape, kernel, monkeypatch):
    """scaled_int8_mm with a scale per row per 128 elements of K (grad_weight_token_blocks: K is the tokens) against
    the torch path; auto never takes the Gluon kernel for it. 1000 and 130 leave K unaligned for TMA (the classic
    kernel then)."""
    from qt.kernels import scaled_int8_mm
    from qt.kernels.int8_mm import K_BLOCK

    monkeypatch.setenv("QT_INT8_MM_KERNEL", kernel)
    m, n, k = shape
    torch.manual_seed(0)
    a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8).t()
    row_scale = torch.rand(m, -(-k // K_BLOCK), device="cuda", dtype=torch.bfloat16) + 0.5
    col_scale = torch.rand(1, n, device="cuda", dtype=torch.bfloat16) + 0.5
    got = through("triton", scaled_int8_mm)(a, b, row_scale, col_scale)
    # float64 reference, block by block (the torch path's torch._int_mm takes no operand of 16 rows or fewer on CUDA)
    want = sum(a[:, start:start + K_BLOCK].double() @ b[start:start + K_BLOCK].double() * row_scale[:, [block]].double()
               for block, start in enumerate(range(0, k, K_BLOCK))) * col_scale.double()
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("shape", [(16384, 2048), (16384, 5632), (333, 9000), (7, 3)])
def test_column_major_copy_of_codes(shape):
    from qt.kernels import to_column_major

    q = torch.randint(-127, 128, shape, device="cuda", dtype=torch.int8)
    copy = through("triton", to_column_major)(q)
    assert copy.stride() == (1, shape[0]) and torch.equal(copy, q)


@pytest.mark.parametrize(("recipe", "kwargs"), [r for r in RECIPES if not r[1].get("stochastic_rounding")])
def test_compiled_graph_launches_the_kernels_directly(recipe, kwargs):
    from torch._inductor.utils import run_and_get_code

    linear, x, dy = linear_case(recipe, kwargs)
    eager = forward_backward(linear, x, dy)
    torch._dynamo.reset()
    compiled = torch.compile(linear, fullgraph=True)
    result, sources = run_and_get_code(forward_backward, compiled, x, dy)
    code = "\n".join(sources)
    # The one qt op a compiled graph calls (through Python): int8_weight_only's grad_input, opaque so that the
    # compiler's partitioner cannot keep a dequantized copy of every weight for the backward (its peak memory
    # above BF16's otherwise; qt/recipes/int8_weight_only.py). Every other qt kernel is launched directly: these
    # linears are too small for the Gluon INT8 matmul, the one kernel Inductor cannot compile.
    assert set(re.findall(r"torch\.ops\.qt\.(\w+)", code)) <= {"matmul_dequantized_rows"}
    plan = linear.weight.plan
    if any(matmul.int8 for matmul in (plan.output, plan.grad_input, plan.grad_weight)):
        assert "_scaled_int8_mm_kernel" in code
    if plan.grad_weight_sees_quantized_input and plan.grad_weight.int8:  # X's codes copied by qt's kernel
        assert "_to_column_major_kernel" in code
    for got, want in zip(result, eager):
        assert rel_err(got, want) < 1e-2


# FP8: torch._scaled_mm against the emulation, and compiled graphs that call it. 1000 tokens pad grad_weight's K
# to a multiple of 16; 100 output features pad N.
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs FP8 tensor cores (compute capability 8.9 or newer)")
FP8_CASES = [{"scaling": "tensorwise"}, {"scaling": "rowwise"},
             {"scaling": "tensorwise", "grad_dtype": "e4m3", "power_of_two_scales": True},
             {"scaling": "rowwise", "grad_weight": False},
             {"scaling": "rowwise", "grad_weight_sees_quantized_input": True},
             {"grad_weight_sees_quantized_input": True}]


@needs_fp8
@pytest.mark.parametrize("kwargs", FP8_CASES)
@pytest.mark.parametrize("features", [(768, 640), (200, 100)])
def test_fp8_kernel_path_matches_the_emulation(kwargs, features, monkeypatch):
    linear, x, dy = linear_case("fp8_mixed_precision", kwargs, 1000, *features)
    monkeypatch.setenv("QT_FP8_MATMUL", "scaled_mm")
    kernel = forward_backward(linear, x, dy)
    monkeypatch.setenv("QT_FP8_MATMUL", "emulated")
    emulated = forward_backward(linear, x, dy)
    # The same FP8 operands (the casts are the same torch ops either way). The gradients differ only by the
    # order of float32 sums (then a rare last-bit flip of the bf16 result); the output also by the forward's
    # fast accumulation (fewer accumulator bits on Hopper).
    tolerances = {"output": 1e-2, "grad_input": 1e-3, "grad_weight": 1e-3}
    for (name, tolerance), got, want in zip(tolerances.items(), kernel, emulated):
        assert rel_err(got, want) < tolerance, name


@needs_fp8
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_fp8_kernel_path_keeps_non_finite_values_visible(scaling, monkeypatch):
    monkeypatch.setenv("QT_FP8_MATMUL", "scaled_mm")
    linear, x, _ = linear_case("fp8_mixed_precision", {"scaling": scaling})
    x[2, 5] = float("nan")
    out = linear(x)
    assert not torch.isfinite(out[2]).all()
    assert torch.isfinite(out[3]).all() == (scaling == "rowwise")  # one tensor-wise scale covers every row


@needs_fp8
@pytest.mark.parametrize("codes", [False, True])
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_compiled_fp8_graphs_call_scaled_mm_without_a_graph_break(scaling, codes):
    from torch._inductor.utils import run_and_get_code

    linear, x, dy = linear_case("fp8_mixed_precision", {"scaling": scaling, "grad_weight_sees_quantized_input": codes})
    eager = forward_backward(linear, x, dy)
    torch._dynamo.reset()
    compiled = torch.compile(linear, fullgraph=True)  # fullgraph: a graph break is an error
    result, sources = run_and_get_code(forward_backward, compiled, x, dy)
    assert len(sources) >= 2 and all("_scaled_mm" in source for source in sources)  # forward and backward
    # X's FP8 codes go column-major through qt's kernel, as int8 bytes.
    assert ("_to_column_major_kernel" in "\n".join(sources)) == codes
    # Fusion keeps some bf16 intermediates in float32 (the output before its bias): FP8 codes may flip downstream.
    for got, want in zip(result, eager):
        assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("shape", [(16384, 2048, 2048), (2048, 5632, 16384), (1000, 264, 336), (130, 8, 16),
                                   (100, 24, 20), (0, 16, 32), (64, 16, 0)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("choice", ["auto", "gluon"])
def test_gluon_int8_matmul_gives_the_tma_kernels_bits(shape, out_dtype, choice, monkeypatch):
    """The Gluon kernel (qt/kernels/int8_mm_gluon.py; `auto` picks it on Hopper) against the TMA kernel: the same
    int32 sums and epilogue, the same bits; edges of every kind (M, N and K not multiples of the tiles), operands TMA
    cannot address (K=20: the classic kernel runs) and empty ones. Compiled too (an opaque op)."""
    from qt.kernels import scaled_int8_mm

    m, n, k = shape
    torch.manual_seed(0)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda").t()
    row_scale = torch.rand(m, 1, device="cuda", dtype=torch.bfloat16)
    col_scale = torch.rand(1, n, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("QT_INT8_MM_KERNEL", "tma")
    want = scaled_int8_mm(a, b, row_scale, col_scale, out_dtype)
    monkeypatch.setenv("QT_INT8_MM_KERNEL", choice)
    assert torch.equal(scaled_int8_mm(a, b, row_scale, col_scale, out_dtype), want)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: scaled_int8_mm(*args, out_dtype), fullgraph=True)
    assert torch.equal(compiled(a, b, row_scale, col_scale), want)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs Hopper")
def test_gluon_kernel_gives_the_tma_kernels_bits_at_any_program_count():
    """scripts/bench_comm_overlap.py launches the Gluon kernel with fewer programs than SMs and one program a tile:
    each program then loops over another share of the tiles, with the same bits."""
    import triton

    from qt.kernels import int8_mm_gluon, scaled_int8_mm

    torch.manual_seed(0)
    config = int8_mm_gluon.CONFIGS[torch.bfloat16]
    for m, n, k in [(4096, 2304, 512), (1000, 264, 336)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda").t()
        scales = (torch.rand(m, 1, device="cuda"), torch.rand(1, n, device="cuda"))
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("QT_INT8_MM_KERNEL", "tma")
            want = scaled_int8_mm(a, b, *scales, torch.bfloat16)
        tiles = triton.cdiv(m, config[0]) * triton.cdiv(n, config[1])
        for programs in (1, 7, 108, None, tiles):
            got = int8_mm_gluon.launch(a, b, *scales, torch.empty_like(want), config, programs)
            assert torch.equal(got, want), programs


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs Hopper")
@pytest.mark.parametrize(("shape", "gluon"), [((16384, 2048, 2048), True), ((2048, 2048, 16384), True),
                                              ((768, 768, 16384), False), ((2560, 768, 16384), False),
                                              ((1000, 640, 768), False)])
def test_auto_takes_the_gluon_kernel_where_its_tiles_fill_the_gpu(shape, gluon):
    """The measured rule (docs/kernels.md, round 19): Gluon's 128 x 256 tiles where they keep half of the SMs busy,
    the TMA kernel's autotuned tiles where fewer output tiles leave SMs idle (the 124M Llama's grad_weight)."""
    from qt.kernels import int8_mm

    m, n, k = shape
    a = torch.zeros(m, k, dtype=torch.int8, device="cuda")
    b = torch.zeros(n, k, dtype=torch.int8, device="cuda").t()
    assert int8_mm._gluon_chosen(a, b, torch.bfloat16, "auto") == gluon
    assert int8_mm._gluon_chosen(a, b, torch.bfloat16, "gluon")
