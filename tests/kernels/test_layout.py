"""to_column_major: the same int8 values, each column contiguous, through the Triton kernel (interpreted) and torch."""

import json
import re

import pytest
import torch

from qt.kernels import layout
from qt.kernels.layout import to_column_major
from tests.kernels import inductor_for_a_gpu
from tests.kernels.backends import through


def codes(rows: int, cols: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows + cols)
    return torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=generator)


# Odd shapes cross the 64 x 64 tiles' edges; 1 x 200 is a row across several tiles (200 x 1, a column, is
# column-major already).
@pytest.mark.parametrize("shape", [(1, 200), (200, 1), (65, 63), (130, 257), (3, 5)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_values_and_layout(shape, backend):
    q = codes(*shape)
    out = through(backend, to_column_major)(q)
    assert out.t().is_contiguous() and out.dtype == torch.int8
    assert torch.equal(out, q)


def test_the_kernel_runs_and_reads_any_strides(monkeypatch):
    """The Triton path launches the kernel (not the torch copy), and reads views with other strides: every other
    row, a slice of the columns, and a strided transposed view."""
    wrapped = []
    original = layout.wrap_triton
    monkeypatch.setattr(layout, "wrap_triton", lambda kernel: wrapped.append(kernel) or original(kernel))
    full = codes(140, 90)
    for view in (full[::2], full[:, 3:80], full.t()[:, ::3]):
        out = through("triton", to_column_major)(view)
        assert out.stride() == (1, view.shape[0]) and torch.equal(out, view)
    assert len(wrapped) == 3


def test_a_column_major_input_is_returned_as_it_is():
    q = codes(20, 30).t().contiguous().t()
    assert to_column_major(q) is q


def test_empty():
    out = through("triton", to_column_major)(torch.empty(0, 7, dtype=torch.int8))
    assert out.shape == (0, 7)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp8_codes_keep_their_bits_and_dtype(dtype, backend):
    q = codes(65, 130).view(dtype)  # every byte, NaN encodings included
    out = through(backend, to_column_major)(q)
    assert out.dtype == dtype and out.t().is_contiguous()
    assert torch.equal(out.view(torch.int8), q.view(torch.int8))


@pytest.mark.parametrize("bad", [torch.zeros(4, 4), torch.zeros(2, 3, 4, dtype=torch.int8)])
def test_other_tensors_are_refused(bad):
    with pytest.raises(ValueError, match="to_column_major: q must be a 2-D tensor of int8 or FP8 codes"):
        to_column_major(bad)


def test_opcheck():
    torch.library.opcheck(torch.ops.qt.to_column_major.default, (codes(33, 17),))


_CODES_SCRIPT = """
import json, sys
import qt
from torch import nn

linear = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
qt.quantize_(linear, sys.argv[1], filter_fn=lambda m, n: True, grad_weight_sees_quantized_input=True,
             **json.loads(sys.argv[2]))

def step(x):
    linear(x).float().square().sum().backward()

try:
    torch.compile(step)(torch.randn(128, 64, dtype=torch.bfloat16, requires_grad=True))
except Exception:  # the launch, with no GPU
    pass
"""


@pytest.mark.slow  # a process of its own, compiling
@pytest.mark.parametrize(("recipe", "options", "compiled_first"), [
    ("int8_mixed_precision", {}, "_quantize_whole_rows_kernel"),
    ("fp8_mixed_precision", {"scaling": "rowwise"}, "def triton_"),  # Inductor's FP8 casts
])
def test_compiled_codes_for_grad_weight_are_copied_by_the_kernel(tmp_path, recipe, options, compiled_first):
    """A recipe with grad_weight_sees_quantized_input, compiled for a GPU: X's codes (INT8, or FP8 as int8 bytes) go
    column-major through qt's kernel (placed in the forward by the partitioner), not through a copy Inductor
    generates (which ran at ~0.3 TB/s on an H100)."""
    log = inductor_for_a_gpu.run(_CODES_SCRIPT, tmp_path, recipe, json.dumps(options), log_code=True).stderr
    assert compiled_first in log, f"nothing compiled; the log ends:\n{log[-3000:]}"
    assert "_to_column_major_kernel" in log, log[-3000:]
    assert not re.search(r"def triton_\w*clone", log), "Inductor copies the codes itself"
