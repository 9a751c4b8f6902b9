"""scaled_int8_mm: the Triton kernel (under TRITON_INTERPRET=1) and the torch fallback against an exact reference."""

import importlib

import pytest
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode

from qt.kernels import int8_mm, quantize_int8, scaled_int8_mm
from qt.kernels.int8_mm import K_BLOCK
from tests.kernels.backends import through

# (M, N, K): odd sizes that leave partial tiles in every dimension, including K < one 32-wide K step, and
# every size-1 dimension (whose operands can have ambiguous strides, such as a [1, K] row with strides (1, 1)).
SHAPES = [(1, 1, 1), (17, 33, 70), (33, 130, 17), (70, 17, 33), (130, 70, 130), (1, 130, 70), (17, 1, 70),
          (17, 33, 1), (1, 1, 70), (17, 1, 1), (1, 33, 1)]
LAYOUTS = {  # name -> (a row-major, b row-major)
    "a_row_b_col": (True, False),
    "a_row_b_row": (True, True),
    "a_col_b_col": (False, False),
    "a_col_b_row": (False, True),
}
# Allowed relative error of the scaled output. fp32: the int32 -> fp32 conversion and two products round
# once each (2**-24 apiece). bf16 adds the final rounding, which Triton's interpreter does by truncation:
# up to one bf16 ulp, 2**-7.
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7}

mm_paths = pytest.mark.parametrize("mm", [through("triton", scaled_int8_mm), through("torch", scaled_int8_mm)],
                                   ids=["triton", "fallback"])


def random_int8(rows: int, cols: int, row_major: bool) -> torch.Tensor:
    if row_major:
        return torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    return torch.randint(-127, 128, (cols, rows), dtype=torch.int8).t()


def random_operands(m: int, n: int, k: int, layout: str = "a_row_b_col") -> tuple[torch.Tensor, torch.Tensor]:
    a_row_major, b_row_major = LAYOUTS[layout]
    return random_int8(m, k, a_row_major), random_int8(k, n, b_row_major)


def reference(a: torch.Tensor, b: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
    exact_product = a.long() @ b.long()
    return exact_product.double() * row_scale.double().reshape(-1, 1) * col_scale.double().reshape(1, -1)


def assert_matches_reference(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.dtype in RTOL
    error = (out.double() - expected).abs()
    # The tiny absolute term only matters where the exact product is 0.
    assert (error <= RTOL[out.dtype] * expected.abs() + 1e-30).all(), f"max error {error.max().item()}"


@mm_paths
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_matches_reference_in_every_layout(mm, m, n, k, layout):
    torch.manual_seed(m * n * k)
    a, b = random_operands(m, n, k, layout)
    row_scale, col_scale = torch.rand(m, 1) + 0.5, torch.rand(1, n) + 0.5
    out = mm(a, b, row_scale, col_scale)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert_matches_reference(out, reference(a, b, row_scale, col_scale))


@mm_paths
@pytest.mark.parametrize("layout", LAYOUTS)
def test_int32_accumulation_is_exact(mm, layout):
    # With unit scales the output is the integer product itself (exact in fp32 below 2**24). Extreme
    # operands make any lossy accumulation visible.
    m, n, k = 33, 70, 130
    a_row_major, b_row_major = LAYOUTS[layout]
    a = torch.where(random_int8(m, k, a_row_major) >= 0, 127, -127).to(torch.int8)
    b = torch.where(random_int8(k, n, b_row_major) >= 0, 127, -127).to(torch.int8)
    out = mm(a, b, torch.ones(m, 1), torch.ones(1, n))
    assert torch.equal(out, (a.long() @ b.long()).float())


@mm_paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_scale_shape", ["column", "vector"])
@pytest.mark.parametrize("col_scale_shape", ["row", "vector", "tensor-wise", "tensor-wise 0-d"])
def test_scale_shapes_and_dtypes(mm, dtype, row_scale_shape, col_scale_shape):
    m, n, k = 33, 70, 130
    torch.manual_seed(0)
    a, b = random_operands(m, n, k)
    row_scale = (torch.rand(m) + 0.5).to(dtype)
    row_scale = row_scale.reshape(m, 1) if row_scale_shape == "column" else row_scale
    col_scale = {
        "row": torch.rand(1, n),
        "vector": torch.rand(n),
        "tensor-wise": torch.rand(1),
        "tensor-wise 0-d": torch.rand(()),
    }[col_scale_shape].add(0.5).to(dtype)
    out = mm(a, b, row_scale, col_scale)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_matches_reference(out, reference(a, b, row_scale, col_scale))


@mm_paths
def test_strided_scale_vectors(mm):
    m, n, k = 17, 33, 70
    a, b = random_operands(m, n, k)
    row_scale = (torch.rand(m, 3) + 0.5)[:, 1:2]  # a column of a wider tensor: stride 3
    col_scale = (torch.rand(2, n) + 0.5)[1:]
    assert_matches_reference(mm(a, b, row_scale, col_scale), reference(a, b, row_scale, col_scale))


# A scale per row of a per K_BLOCK (128) elements of K, as grad_weight's dY can have per 128 tokens: K of one block
# and a bit, of whole blocks, of a partial last block.
K_BLOCKED_SHAPES = [(5, 9, 129), (33, 70, 256), (17, 33, 300), (1, 1, 257)]


def k_blocked_reference(a, b, row_scale, col_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact result, and the sum of its terms' magnitudes (each block's contribution), which bounds fp32's
    error in summing the blocks."""
    terms = [(a[:, start:start + K_BLOCK].long() @ b[start:start + K_BLOCK].long()).double()
             * row_scale[:, block:block + 1].double() * col_scale.double().reshape(1, -1)
             for block, start in enumerate(range(0, a.shape[1], K_BLOCK))]
    return sum(terms), sum(term.abs() for term in terms)


@mm_paths
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("m", "n", "k"), K_BLOCKED_SHAPES)
def test_scales_per_block_of_k_match_the_reference(mm, m, n, k, layout):
    torch.manual_seed(m + n + k)
    a, b = random_operands(m, n, k, layout)
    row_scale, col_scale = torch.rand(m, triton.cdiv(k, K_BLOCK)) * 4 + 0.1, torch.rand(1, n) + 0.5
    out = mm(a, b, row_scale, col_scale)
    expected, magnitude = k_blocked_reference(a, b, row_scale, col_scale)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # Each block's sum scaled, then the blocks summed: an fp32 rounding or two per block.
    assert ((out.double() - expected).abs() <= 2 * triton.cdiv(k, K_BLOCK) * 2**-24 * magnitude + 1e-30).all()


@mm_paths
def test_equal_scales_in_every_block_of_k_give_the_row_wise_result(mm):
    m, n, k = 17, 33, 300
    a, b = random_operands(m, n, k)
    row_scale, col_scale = torch.rand(m, 1) + 0.5, torch.rand(1, n) + 0.5
    by_block = row_scale.expand(m, triton.cdiv(k, K_BLOCK))  # a stride of 0 between blocks
    _, magnitude = k_blocked_reference(a, b, by_block, col_scale)
    difference = (mm(a, b, by_block, col_scale) - mm(a, b, row_scale, col_scale)).double().abs()
    assert (difference <= 2 * triton.cdiv(k, K_BLOCK) * 2**-24 * magnitude).all()


@mm_paths
@pytest.mark.parametrize(("m", "n", "k"), [(17, 33, 0), (0, 33, 70), (17, 0, 70)])
def test_empty_operands(mm, m, n, k):
    """A micro-batch without tokens makes an empty reduction (grad_weight) or an empty output."""
    a, b = random_operands(m, n, k)
    out = mm(a, b, torch.ones(m, 1), torch.ones(1, n))
    assert out.shape == (m, n) and (out == 0).all()


@mm_paths
def test_large_scales_do_not_overflow_where_the_result_fits(mm):
    # Inputs near 1e37 quantize to scales near 1e35; the weight's scale near 1e-3. The INT32 sum times the
    # first scale alone would pass fp32's 3.4e38; the result (~1e36) fits.
    a = torch.full((4, 64), 127, dtype=torch.int8)
    b = torch.full((64, 3), 127, dtype=torch.int8)
    row_scale, col_scale = torch.full((4, 1), 1e35), torch.full((1, 3), 1e-3)
    out = mm(a, b, row_scale, col_scale)
    assert torch.isfinite(out).all()
    assert_matches_reference(out, reference(a, b, row_scale, col_scale))


@mm_paths
def test_output_dtype(mm):
    a, b = random_operands(17, 33, 70)
    row_scale, col_scale = torch.rand(17, 1) + 0.5, torch.rand(1, 33) + 0.5
    out = mm(a, b, row_scale, col_scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_matches_reference(out, reference(a, b, row_scale, col_scale))


def test_opcheck():
    a, b = random_operands(17, 33, 70)
    for col_scale in (torch.rand(1, 33), torch.rand(1)):
        torch.library.opcheck(torch.ops.qt.scaled_int8_mm.default,
                              (a, b, torch.rand(17, 1), col_scale, torch.float32, "auto"))


def test_compiled_quantized_linear_matches_eager():
    def quantized_linear(x, w):
        x_q, x_scale = quantize_int8(x, axis=1)
        w_q, w_scale = quantize_int8(w, axis=0)  # K-contiguous, as the kernel likes it
        return scaled_int8_mm(x_q, w_q, x_scale, w_scale)

    x, w = torch.randn(33, 70, dtype=torch.bfloat16), torch.randn(70, 17, dtype=torch.bfloat16)
    compiled = torch.compile(quantized_linear, fullgraph=True)
    assert torch.equal(compiled(x, w), quantized_linear(x, w))


def bad_mm_inputs() -> list:
    i8 = torch.int8
    a, b, rs, cs = torch.zeros(4, 8, dtype=i8), torch.zeros(8, 6, dtype=i8), torch.ones(4, 1), torch.ones(1, 6)
    cases = [
        ("float a", (a.float(), b, rs, cs), TypeError, "must be int8"),
        ("int32 b", (a, b.int(), rs, cs), TypeError, "must be int8"),
        ("3-D a", (a[None], b, rs, cs), ValueError, "must be 2-D"),
        ("K mismatch", (a, b[:7], rs, cs), ValueError, r"must be \[K, N\] with K = 8"),
        ("integer row_scale", (a, b, rs.int(), cs), TypeError, "row_scale must be a floating-point"),
        ("integer col_scale", (a, b, rs, cs.long()), TypeError, "col_scale must be a floating-point"),
        ("row_scale of the wrong length", (a, b, torch.ones(5, 1), cs), ValueError, "row_scale must have shape"),
        ("row_scale as a row", (a, b, torch.ones(1, 4), cs), ValueError, "row_scale must have shape"),
        ("row_scale with more blocks than K has", (a.repeat(1, 25), b.repeat(25, 1), torch.ones(4, 3), cs),
         ValueError, r"\[4, 2\] \(one per row per 128"),
        ("col_scale of the wrong length", (a, b, rs, torch.ones(1, 5)), ValueError, "col_scale must have shape"),
        ("col_scale as a column", (a, b, rs, torch.ones(6, 1)), ValueError, "col_scale must have shape"),
        ("scales on another device", (a, b, rs.to("meta"), cs), ValueError, "one device"),
    ]
    return [pytest.param(args, error, message, id=name) for name, args, error, message in cases]


@pytest.mark.parametrize(("args", "error", "message"), bad_mm_inputs())
def test_bad_inputs_raise(args, error, message):
    with pytest.raises(error, match=message):
        scaled_int8_mm(*args)


# The persistent TMA kernel (QT_INT8_MM_KERNEL=tma), which Triton's CPU interpreter runs with descriptors
# emulated by masked loads and stores. Its operands must be K-contiguous with 16-byte aligned rows: K and the
# output's row (N elements) multiples of 16 bytes. The odd M, N and K leave partial tiles in every dimension of
# the interpreter's 32 x 32 x 128 tile (K of one step and of three), and more tiles than programs, so programs loop
# over several tiles.
TMA_SHAPES = [(37, 48, 80), (70, 96, 272)]


def kernel_output(monkeypatch, kernel: str, *args) -> torch.Tensor:
    monkeypatch.setenv("QT_INT8_MM_KERNEL", kernel)
    return through("triton", scaled_int8_mm)(*args)


@pytest.mark.parametrize("epilogue_subtile", [True, False], ids=["subtiled_epilogue", "whole_epilogue"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("col_scale_shape", ["row", "tensor-wise"])
@pytest.mark.parametrize(("m", "n", "k"), TMA_SHAPES)
def test_tma_kernel_matches_the_classic_kernel_bit_for_bit(monkeypatch, m, n, k, col_scale_shape, dtype,
                                                           epilogue_subtile):  # fmt: skip
    kernel = int8_mm._persistent_tma_scaled_int8_mm_kernel
    config = kernel.configs[0]
    monkeypatch.setattr(kernel, "configs", [triton.Config({**config.kwargs, "EPILOGUE_SUBTILE": epilogue_subtile})])
    torch.manual_seed(m + n + k)
    a, b = random_operands(m, n, k)
    row_scale = (torch.rand(m, 1) + 0.5).to(dtype)
    col_scale = (torch.rand(1, n) if col_scale_shape == "row" else torch.rand(1)).add(0.5).to(dtype)
    assert int8_mm._use_tma_kernel(a, b, torch.empty(m, n, dtype=dtype), "tma")
    out = kernel_output(monkeypatch, "tma", a, b, row_scale, col_scale)
    # The interpreter rounds to bf16 by truncation, so only an fp32 output can match torch's bf16 rounding.
    assert torch.equal(out, kernel_output(monkeypatch, "classic", a, b, row_scale, col_scale))
    if dtype == torch.float32:
        assert torch.equal(out, through("torch", scaled_int8_mm)(a, b, row_scale, col_scale))


@pytest.mark.parametrize(("m", "n", "k"), TMA_SHAPES)
def test_tma_kernel_matches_the_classic_kernel_with_scales_per_block_of_k(monkeypatch, m, n, k):
    torch.manual_seed(m + n + k)
    a, b = random_operands(m, n, k)
    row_scale, col_scale = torch.rand(m, triton.cdiv(k, K_BLOCK)) + 0.5, torch.rand(1, n) + 0.5
    out = kernel_output(monkeypatch, "tma", a, b, row_scale, col_scale)
    assert torch.equal(out, kernel_output(monkeypatch, "classic", a, b, row_scale, col_scale))
    assert torch.equal(out, through("torch", scaled_int8_mm)(a, b, row_scale, col_scale))


def test_tma_kernel_sums_exactly_in_int32(monkeypatch):
    m, n, k = 37, 48, 80
    a = torch.where(random_int8(m, k, True) >= 0, 127, -127).to(torch.int8)
    b = torch.where(random_int8(k, n, False) >= 0, 127, -127).to(torch.int8)
    out = kernel_output(monkeypatch, "tma", a, b, torch.ones(m, 1), torch.ones(1, n))
    assert torch.equal(out, (a.long() @ b.long()).float())


def tma_operands(**change) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K-contiguous a [M, K] and b [K, N] and an output [M, N] that TMA can address, with one thing changed."""
    m, n, k, dtype = change.get("m", 8), change.get("n", 16), change.get("k", 32), change.get("dtype", torch.bfloat16)
    a, b = random_operands(m, n, k, change.get("layout", "a_row_b_col"))
    if "a_offset" in change:  # a view starting a few bytes into its storage
        a = torch.zeros(m * k + change["a_offset"], dtype=torch.int8)[change["a_offset"]:].view(m, k)
    return a, b, torch.empty(m, n, dtype=dtype)


@pytest.mark.parametrize(("change", "tma"), [
    ({}, True),
    ({"m": 1, "n": 8}, True),
    ({"layout": "a_row_b_row"}, False),  # b N-contiguous
    ({"layout": "a_col_b_col"}, False),  # a M-contiguous
    ({"k": 40}, False),  # rows of 40 bytes
    ({"a_offset": 8}, False),  # a starts 8 bytes into its storage
    ({"a_offset": 16}, True),
    ({"n": 12}, False),  # output rows of 24 bytes
    ({"n": 12, "dtype": torch.float32}, True),  # 48 bytes
], ids=["aligned", "one_row", "b_row_major", "a_col_major", "k_40", "a_8_bytes_off", "a_16_bytes_off",
        "bf16_n_12", "fp32_n_12"])  # fmt: skip
def test_tma_kernel_takes_only_operands_tma_can_address(change, tma):
    assert int8_mm._use_tma_kernel(*tma_operands(**change), "tma") == tma


def test_tma_alignment_of_traced_operands_comes_from_their_storage_offset():
    # Under torch.compile the kernel is chosen on fake tensors, which have no address.
    with FakeTensorMode():
        for offset, aligned in ((8, False), (16, True)):
            a = torch.empty(8 * 32 + offset, dtype=torch.int8)[offset:].view(8, 32)
            b = torch.empty(16, 32, dtype=torch.int8).t()
            assert int8_mm._tma_can_address(a, b, torch.empty(8, 16, dtype=torch.bfloat16)) == aligned


@pytest.mark.parametrize(("choice", "tma"), [("auto", False), ("classic", False), ("tma", True)])
def test_kernel_choice_on_the_cpu(choice, tma):
    """`auto` takes the TMA kernel only on a GPU with TMA, `classic` never, `tma` wherever the operands allow."""
    assert int8_mm._use_tma_kernel(*tma_operands(), choice) == tma


@pytest.mark.parametrize("choice", ["classic", "tma"])
def test_kernel_choice_is_part_of_the_compiled_graph(monkeypatch, choice):
    """QT_INT8_MM_KERNEL is read while torch.compile traces the call and becomes an argument of the op in the graph,
    so graphs compiled with different choices differ, and Inductor's on-disk caches (keyed on the graph) cannot give
    a process the kernel another process chose. Read inside the op, it was lost that way on a GPU."""
    monkeypatch.setenv("QT_INT8_MM_KERNEL", choice)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    a, b = random_operands(8, 16, 32)
    torch._dynamo.reset()
    torch.compile(scaled_int8_mm, backend=recording_backend, fullgraph=True)(a, b, torch.ones(8, 1), torch.ones(1, 16))
    (call,) = [node for node in graphs[0].graph.nodes if node.target == torch.ops.qt.scaled_int8_mm]
    assert call.args[-1] == choice


def test_invalid_kernel_choice_raises(monkeypatch):
    monkeypatch.setenv("QT_INT8_MM_KERNEL", "wgmma")
    a, b, _ = tma_operands()
    with pytest.raises(ValueError, match="QT_INT8_MM_KERNEL='wgmma': use one of auto, tma, classic, gluon"):
        through("triton", scaled_int8_mm)(a, b, torch.ones(8, 1), torch.ones(1, 16))


def test_gluon_choice_without_a_hopper_gpu_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("QT_INT8_MM_KERNEL", "gluon")
    a, b = random_operands(8, 16, 32)
    with pytest.raises(RuntimeError, match="QT_INT8_MM_KERNEL=gluon needs a Hopper GPU"):
        scaled_int8_mm(a, b, torch.ones(8, 1), torch.ones(1, 16))


def test_the_gluon_op_runs_on_cuda_tensors_and_traces_to_its_output_shape():
    """The op compiled graphs call: a kernel for CUDA tensors only, and a fake one that tracing (torch.compile's fake
    CUDA tensors, which a CPU machine can make) reads the output's shape and dtype from."""
    importlib.import_module("qt.kernels.int8_mm_gluon")  # registers the op

    assert torch._C._dispatch_has_kernel_for_dispatch_key("qt::scaled_int8_mm_gluon", "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("qt::scaled_int8_mm_gluon", "CPU")
    with FakeTensorMode():
        a = torch.empty(40, 32, dtype=torch.int8, device="cuda")
        b = torch.empty(24, 32, dtype=torch.int8, device="cuda").t()
        out = torch.ops.qt.scaled_int8_mm_gluon(a, b, torch.empty(40, 1, device="cuda"),
                                                torch.empty(1, 24, device="cuda"), torch.float32)
    assert (out.shape, out.dtype, out.device.type) == ((40, 24), torch.float32, "cuda")
