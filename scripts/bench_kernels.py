"""Checks and times qt's INT8 kernels on a CUDA GPU (written for an H100).

    PYTHONPATH=. python scripts/bench_kernels.py [--quick] [--m 16384] [--quantize_only] [--baseline FILE]
    PYTHONPATH=. python scripts/bench_kernels.py --training_matmuls [--model llama-120m] [--mm_kernels tma,gluon]
    PYTHONPATH=. python scripts/bench_kernels.py --whole_row_configs [--m 2048] [--cuda_graphs]
    PYTHONPATH=. python scripts/bench_kernels.py --tile_configs
    PYTHONPATH=. python scripts/bench_kernels.py --column_major_configs
    PYTHONPATH=. python scripts/bench_kernels.py --fp8_casts [--baseline OLD_FP8_PY]
    PYTHONPATH=. python scripts/bench_kernels.py --launch_overhead

--training_matmuls: the three matmuls of each TinyLlama-1.1B (or --model's) linear in a training step, as the recipes
run them (output, grad_input, and grad_weight, which reduces over the tokens), K-contiguous: qt's INT8 kernel against
torch._scaled_mm in FP8 with row-wise scales (what fp8_mixed_precision rowwise runs) and bf16 torch.mm.

scaled_int8_mm on Llama-1B linear shapes (M tokens x N outputs x K inputs) in three operand layouts,
against torch._int_mm (the int32 product alone) and a bf16 torch.mm of the same shape; then
quantize_int8 on a [16384, 2048] bf16 activation, both axes, with and without stochastic rounding,
against the same math in eager torch. Each case is first checked against its torch counterpart.
--baseline FILE times another version of qt/kernels/quantize.py beside the current one (e.g.
`git show REV:qt/kernels/quantize.py > FILE`), in the same process, for before/after figures.
Prints a markdown table last; with $OUT set, also writes it and a JSON of every number there.
"""

import argparse
import functools
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

from qt.kernels import quantize_int8, quantize_int8_rows_and_cols, quantize_int8_rows_keeping_col_amax, scaled_int8_mm
from qt.kernels import int8_mm, int8_mm_gluon
from qt.kernels.fp8 import abs_max
from qt.kernels.quantize import _torch_quantize_int8

LLAMA_1B_NK = [(2048, 2048), (5632, 2048), (2048, 5632)]  # (N, K): q/o projections, MLP up, MLP down
TRAINING_MATMULS = {  # name -> (M, N, K) of a linear with in_features K_in, out_features N_out, over T tokens
    "output": lambda t, k_in, n_out: (t, n_out, k_in),
    "grad_input": lambda t, k_in, n_out: (t, k_in, n_out),
    "grad_weight": lambda t, k_in, n_out: (n_out, k_in, t),
}
LAYOUTS = {  # name -> (a row-major, b row-major); the first is the K-contiguous one the recipes use
    "a row, b col": (True, False),
    "a row, b row": (True, True),
    "a col, b row": (False, True),
}
DEVICE = "cuda"
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
MAX_REL_ERR = 1e-2  # bf16 output rounding alone gives ~1e-3 (normwise)


CUDA_GRAPHS = False  # --cuda_graphs


def time_ms(fn) -> float:
    """Median milliseconds of `fn`. With --cuda_graphs, of replays of a CUDA graph of it: no Python or launch
    overhead, which otherwise bounds kernels of a few tens of microseconds (a master weight's quantize pass)."""
    if CUDA_GRAPHS:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return triton.testing.do_bench(fn, return_mode="median")


def timing() -> str:
    return ("medians of CUDA-graph replays (triton.testing.do_bench_cudagraph: no launch overhead)" if CUDA_GRAPHS
            else "medians of triton.testing.do_bench (launch overhead included)")


def picked_config(a: torch.Tensor, b: torch.Tensor) -> str:
    """The autotuned config of the kernel scaled_int8_mm ran for a @ b (call it first)."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.bfloat16, device=a.device)
    if int8_mm._gluon_chosen(a, b, torch.bfloat16, int8_mm._kernel_choice()) and int8_mm._tma_can_address(a, b, out):
        return "gluon {}x{}x{} s{}".format(*int8_mm_gluon.CONFIGS[torch.bfloat16])
    tma = int8_mm._use_tma_kernel(a, b, out, int8_mm._kernel_choice())
    config = (int8_mm._persistent_tma_scaled_int8_mm_kernel if tma else int8_mm._scaled_int8_mm_kernel).best_config
    kw = config.kwargs
    return (("tma " if tma else "") + f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} "
            f"s{config.num_stages}" + (" halves" if kw.get("EPILOGUE_SUBTILE") else ""))


def int8_matrix(rows: int, cols: int, row_major: bool) -> torch.Tensor:
    shape = (rows, cols) if row_major else (cols, rows)
    matrix = torch.randint(-127, 128, shape, dtype=torch.int8, device=DEVICE)
    return matrix if row_major else matrix.t()


def int_mm_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Operands torch._int_mm accepts: a and b as given if it takes them, else K-contiguous copies."""
    try:
        torch._int_mm(a, b)
        return a, b, "as given"
    except RuntimeError:
        return a.contiguous(), b.t().contiguous().t(), "K-contiguous copies"


def bench_matmul(m: int, n: int, k: int, layout: str) -> dict:
    a_row_major, b_row_major = LAYOUTS[layout]
    a, b = int8_matrix(m, k, a_row_major), int8_matrix(k, n, b_row_major)
    row_scale = torch.rand(m, 1, device=DEVICE, dtype=torch.bfloat16) + 0.5
    col_scale = torch.rand(1, n, device=DEVICE, dtype=torch.bfloat16) + 0.5

    out = scaled_int8_mm(a, b, row_scale, col_scale)  # the first call autotunes
    config = picked_config(a, b)
    int_mm_a, int_mm_b, int_mm_layout = int_mm_operands(a, b)
    expected = torch._int_mm(int_mm_a, int_mm_b).float() * (row_scale.float() * col_scale.float())
    rel_err = ((out.float() - expected).norm() / expected.norm()).item()
    # Both round the same fp32 products to bf16, so they should agree bit for bit.
    mismatched = (out != expected.to(out.dtype)).float().mean().item()
    del out, expected

    a_bf16, b_bf16 = a.to(torch.bfloat16), b.to(torch.bfloat16)  # .to keeps the layout
    ops = 2 * m * n * k
    return {
        "m": m, "n": n, "k": k, "layout": layout, "rel_err": rel_err, "mismatched": mismatched,
        "config": config,
        "qt_tops": ops / time_ms(lambda: scaled_int8_mm(a, b, row_scale, col_scale)) / 1e9,
        "int_mm_tops": ops / time_ms(lambda: torch._int_mm(int_mm_a, int_mm_b)) / 1e9,
        "int_mm_layout": int_mm_layout,
        "bf16_tflops": ops / time_ms(lambda: torch.mm(a_bf16, b_bf16)) / 1e9,
    }  # fmt: skip


def bench_training_matmul(matmul: str, m: int, n: int, k: int) -> dict:
    """qt's INT8 matmul against FP8 torch._scaled_mm (row-wise scales) and bf16 torch.mm, K-contiguous operands."""
    a, b = int8_matrix(m, k, True), int8_matrix(k, n, False)
    row_scale = torch.rand(m, 1, device=DEVICE, dtype=torch.bfloat16) + 0.5
    col_scale = torch.rand(1, n, device=DEVICE, dtype=torch.bfloat16) + 0.5
    out = scaled_int8_mm(a, b, row_scale, col_scale)  # the first call autotunes
    expected = torch._int_mm(a, b).float() * (row_scale.float() * col_scale.float())
    mismatched = (out != expected.to(out.dtype)).float().mean().item()
    config = picked_config(a, b)
    a_fp8 = torch.randn(m, k, device=DEVICE).to(torch.float8_e4m3fn)
    b_fp8 = torch.randn(n, k, device=DEVICE).to(torch.float8_e4m3fn).t()
    fp8_row_scale, fp8_col_scale = row_scale.float(), col_scale.float()
    a_bf16, b_bf16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    ops = 2 * m * n * k
    k_blocks_tops, k_blocks_rel_err = float("nan"), float("nan")
    if matmul == "grad_weight":  # also with a scale per row per 128 tokens (grad_weight_token_blocks)
        block_scale = torch.rand(m, triton.cdiv(k, int8_mm.K_BLOCK), device=DEVICE, dtype=torch.bfloat16) + 0.5
        got = scaled_int8_mm(a, b, block_scale, col_scale)
        expected = sum(torch._int_mm(a[:, start:start + int8_mm.K_BLOCK], b[start:start + int8_mm.K_BLOCK]).float()
                       * block_scale[:, j:j + 1].float() for j, start in enumerate(range(0, k, int8_mm.K_BLOCK)))
        expected = expected * col_scale.float()
        k_blocks_rel_err = ((got.float() - expected).norm() / expected.norm()).item()
        k_blocks_tops = ops / time_ms(lambda: scaled_int8_mm(a, b, block_scale, col_scale)) / 1e9
    return {
        "matmul": matmul, "m": m, "n": n, "k": k, "kernel": os.environ.get("QT_INT8_MM_KERNEL", "auto"),
        "config": config, "mismatched": mismatched,
        "int8_k_blocks_tops": k_blocks_tops, "int8_k_blocks_rel_err": k_blocks_rel_err,
        "int8_tops": ops / time_ms(lambda: scaled_int8_mm(a, b, row_scale, col_scale)) / 1e9,
        "fp8_tflops": ops / time_ms(lambda: torch._scaled_mm(a_fp8, b_fp8, fp8_row_scale, fp8_col_scale,
                                                             out_dtype=torch.bfloat16)) / 1e9,
        "bf16_tflops": ops / time_ms(lambda: torch.mm(a_bf16, b_bf16)) / 1e9,
    }  # fmt: skip


def training_matmuls_markdown(device: str, model: str, rows: list[dict]) -> str:
    lines = [
        f"## A training step's matmuls on {device} (torch {torch.__version__}, triton {triton.__version__})",
        "",
        f"{model} linears over the tokens of one step, K-contiguous operands (the recipes' layout); "
        f"qt's scaled INT8 matmul, torch._scaled_mm FP8 E4M3 with row-wise scales, bf16 torch.mm; {timing()}. "
        "grad_weight also with a scale per row of a per 128 tokens (K), as grad_weight_token_blocks runs it "
        "(relative error against torch._int_mm block by block).",
        "",
        "| matmul | M x N x K | QT_INT8_MM_KERNEL | INT8 TOP/s | INT8, scales per 128 of K: TOP/s (rel. err) "
        "| INT8 config (bits differing from _int_mm) | FP8 TFLOP/s | bf16 TFLOP/s | INT8 / FP8 | INT8 / bf16 |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        k_blocks = (f"{r['int8_k_blocks_tops']:.0f} ({r['int8_k_blocks_rel_err']:.1e})"
                    if r["matmul"] == "grad_weight" else "")
        lines.append(f"| {r['matmul']} | {r['m']} x {r['n']} x {r['k']} | {r['kernel']} | {r['int8_tops']:.0f} "
                     f"| {k_blocks} | {r['config']} ({r['mismatched']:.1%}) "
                     f"| {r['fp8_tflops']:.0f} | {r['bf16_tflops']:.0f} | {r['int8_tops'] / r['fp8_tflops']:.2f} "
                     f"| {r['int8_tops'] / r['bf16_tflops']:.2f} |")
    return "\n".join(lines) + "\n"


QUANTIZE_SHAPES = [(2048, "nearest"), (2048, "stochastic"), (5632, "nearest"), (768, "nearest"), (256, "nearest")]  # (width, rounding)


@functools.cache  # tensors hash by identity: taken once per x, outside the timed calls
def col_amax(x: torch.Tensor) -> torch.Tensor:
    """The abs-max of each column of x as quantize_int8_rows_keeping_col_amax keeps it."""
    return abs_max(x, 0)


@functools.cache  # eager calls take it once per x, outside the timed calls; torch.compile traces through the cache
def row_multipliers(x: torch.Tensor) -> torch.Tensor:
    """Positive numbers, one a row of x, as a linear folds X's scales into its dY's column-wise quantization; a
    function of x alone, so Inductor's compiled torch baseline computes the same ones."""
    return (x[:, :1].abs() + 0.5).to(x.dtype)


QUANTIZE_MODES = {  # name -> (qt function, the same math in torch ops) on x
    "rows": (lambda x, sr: quantize_int8(x, 1, sr), lambda x: _torch_quantize_int8(x, 1, None)),
    "columns": (lambda x, sr: quantize_int8(x, 0, sr), lambda x: _torch_quantize_int8(x, 0, None)),
    "both": (quantize_int8_rows_and_cols,
             lambda x: (*_torch_quantize_int8(x, 1, None), *_torch_quantize_int8(x, 0, None))),
    # A linear's dY, X's per-token scales folded into its columns (grad_weight from X's codes).
    "both, columns multiplied": (
        lambda x, sr: quantize_int8_rows_and_cols(x, sr, row_multipliers(x)),
        lambda x: (*_torch_quantize_int8(x, 1, None), *_torch_quantize_int8(x, 0, None, row_multipliers(x)))),
    # A linear's X and W: by rows in the forward, keeping the columns' abs-max, then by columns in the backward.
    "rows keeping col amax": (quantize_int8_rows_keeping_col_amax,
                              lambda x: (*_torch_quantize_int8(x, 1, None), abs_max(x, 0))),
    "columns, kept amax": (lambda x, sr: quantize_int8(x, 0, sr, col_amax=col_amax(x)),
                           lambda x: _torch_quantize_int8(x, 0, None)),
    # grad_weight_token_blocks: dY's columns per 128 tokens, X's scales folded in (its rows: the "rows" pass).
    "columns per 128 rows, multiplied": (
        lambda x, sr: quantize_int8(x, 0, sr, row_multipliers(x), k_blocks=True),
        lambda x: _torch_quantize_int8(x, 0, None, row_multipliers(x), k_blocks=True)),
}
BASELINE_MODES = {  # name -> the call of a baseline module
    "rows": lambda module, x, sr: module.quantize_int8(x, 1, sr),
    "columns": lambda module, x, sr: module.quantize_int8(x, 0, sr),
    "both": lambda module, x, sr: module.quantize_int8_rows_and_cols(x, sr),
    "both, columns multiplied": lambda module, x, sr: module.quantize_int8_rows_and_cols(x, sr, row_multipliers(x)),
    "rows keeping col amax": lambda module, x, sr: module.quantize_int8_rows_keeping_col_amax(x, sr),
    "columns, kept amax": lambda module, x, sr: module.quantize_int8(x, 0, sr, col_amax=col_amax(x)),
}


def load_baseline(path: str):
    """Another version of a module of qt/kernels/ (quantize.py, fp8.py) as a module of its own: its torch.library ops
    get the namespace qt_baseline, so they do not collide with qt's."""
    source = Path(path).read_text().replace('"qt::', '"qt_baseline::').replace("torch.ops.qt.", "torch.ops.qt_baseline.")
    spec = importlib.util.spec_from_loader(f"qt_baseline_{Path(path).stem}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def bench_quantize(x: torch.Tensor, mode: str, stochastic: bool, baseline=None) -> dict:
    """qt's kernel against the same math in torch ops, eager and compiled by Inductor (the alternative of
    letting torch.compile generate the quantize kernels), and against a baseline version of the kernels."""
    qt_fn, torch_fn = QUANTIZE_MODES[mode]
    outputs, expected = qt_fn(x, stochastic), torch_fn(x)
    compiled = torch.compile(torch_fn, fullgraph=True, dynamic=False)
    compiled_outputs = compiled(x)
    ok = all(a.stride() == b.stride() and a.dtype == b.dtype for a, b in zip(outputs, expected))
    for got, want in zip(outputs, expected):
        if got.dtype == torch.int8 and stochastic:
            # Stochastic roundings use other random numbers: each must stay within 1 of nearest.
            ok &= (got.int() - want.int()).abs().max().item() <= 1
        else:
            ok &= torch.equal(got, want)
    compiled_ok = all(torch.equal(a, b) for a, b in zip(compiled_outputs, expected))
    # Bytes a single pass would move: x read once, every output written once.
    bytes_moved = x.numel() * x.element_size() + sum(t.numel() * t.element_size() for t in outputs)
    qt_ms = time_ms(lambda: qt_fn(x, stochastic))
    compiled_ms = time_ms(lambda: compiled(x)) if not stochastic else float("nan")
    baseline_ms = float("nan")
    if baseline is not None:
        # A baseline from before round 9 has neither the kept maxima's function nor quantize_int8's col_amax.
        if mode in BASELINE_MODES and (hasattr(baseline, "quantize_int8_rows_keeping_col_amax") or "amax" not in mode):
            baseline_ms = time_ms(lambda: BASELINE_MODES[mode](baseline, x, stochastic))
    return {
        "shape": list(x.shape), "mode": mode, "stochastic": stochastic, "ok": bool(ok),
        "qt_us": qt_ms * 1e3, "qt_gbps": bytes_moved / qt_ms / 1e6,
        "inductor_us": compiled_ms * 1e3, "inductor_gbps": bytes_moved / compiled_ms / 1e6,
        "inductor_ok": compiled_ok, "baseline_us": baseline_ms * 1e3,
    }  # fmt: skip


def whole_row_configs_markdown(device: str, m: int) -> str:
    """The whole-row pass (quantize_int8 by rows, up to 8192 columns) that also folds each column's abs-max (of x with
    each row multiplied by a number, as a linear's dY is quantized) at every rows-a-block x rows-a-program x warps x
    pipeline-stages setting, launched directly (no autotuner); first the plain pass (no maxima, its fixed setting)
    for reference. The settings qt/kernels/quantize.py fixes come from this table. `--m` sets the rows (16384:
    activations; 2048 or 5632: a master weight). GB/s counts x read once and q written once."""
    from qt.kernels import quantize

    lines = [f"## Whole-row pass settings on {device} (torch {torch.__version__}, triton {triton.__version__})", "",
             "| x | column abs-max | rows a block | blocks a program | warps | stages | us | GB/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for width in (2048, 5632):
        x = torch.randn(m, width, device=DEVICE, dtype=torch.bfloat16)
        multipliers = torch.rand(m, device=DEVICE, dtype=torch.bfloat16)
        q, scale = torch.empty_like(x, dtype=torch.int8), torch.empty(m, 1, device=DEVICE, dtype=torch.bfloat16)
        col_amax = torch.zeros(width, device=DEVICE)
        default_rows, block_cols = quantize.whole_row_blocks(width)
        settings = [(False, default_rows, 1, 4, 1)] + [
            (True, block_rows, rows // block_rows, warps, stages)
            for block_rows in (1, 2, 4, 8) if block_rows * block_cols <= 16384
            for rows in (16, 32, 64, 128) if rows >= block_rows
            for warps in (4, 8) for stages in (1, 2, 3)]
        for keep_col_amax, block_rows, blocks, warps, stages in settings:
            def launch():
                quantize._quantize_whole_rows_kernel[(triton.cdiv(m, block_rows * blocks),)](
                    x, q, scale, None, col_amax if keep_col_amax else None, multipliers if keep_col_amax else None,
                    m, width, width, 1, MIN_AMAX=1e-12, STOCHASTIC=False, SCALE_IS_BF16=True,
                    COL_AMAX=keep_col_amax, COLS_MULTIPLIED=keep_col_amax, BLOCK_ROWS=block_rows,
                    BLOCK_COLS=block_cols, BLOCKS_PER_PROGRAM=blocks, NUM_STAGES=stages, num_warps=warps)
            try:
                us = time_ms(launch) * 1e3
            except triton.runtime.errors.OutOfResources as e:  # e.g. shared memory for the stages
                lines.append(f"| {m} x {width} bf16 | yes | {block_rows} | {blocks} | {warps} | {stages} | "
                             f"{type(e).__name__} | |")
                continue
            lines.append(f"| {m} x {width} bf16 | {'yes' if keep_col_amax else 'no'} | {block_rows} "
                         f"| {blocks} | {warps} | {stages} | {us:.1f} | {x.numel() * 3 / us / 1e3:.0f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


TILE_SETTINGS = [(r, c, w) for r, c in ((32, 128), (64, 64), (64, 128), (64, 256), (128, 64), (128, 128), (256, 32),
                                        (256, 64)) for w in (4, 8)]  # (BLOCK_R, BLOCK_C, warps)


def tile_configs_markdown(device: str, m: int) -> str:
    """The column-wise tile pass (what a linear runs for X and dY by columns, their abs-maxima kept, and for W) at
    every tile x warps setting of TILE_SETTINGS, launched directly (no autotuner), on TinyLlama-1.1B's shapes.
    GB/s counts x read once and q written once."""
    from qt.kernels import quantize

    lines = [f"## Column-wise tile pass settings on {device} (torch {torch.__version__}, triton {triton.__version__})",
             "", "| x | BLOCK_R x BLOCK_C | warps | us | GB/s |", "| --- | --- | ---: | ---: | ---: |"]
    for rows, cols in ((m, 2048), (m, 5632), (5632, 2048), (2048, 5632)):
        x = torch.randn(rows, cols, device=DEVICE, dtype=torch.bfloat16)
        amax = abs_max(x, 0)
        q = torch.empty(cols, rows, device=DEVICE, dtype=torch.int8).t()
        scale = torch.empty(1, cols, device=DEVICE, dtype=torch.bfloat16)
        for block_r, block_c, warps in TILE_SETTINGS:
            def launch():
                quantize._tile_quantize_kernel.fn[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))](
                    x, amax, q, scale, None, None, rows, cols, cols, 1, MIN_AMAX=1e-12, ROWS=False, MULTIPLIED=False,
                    STOCHASTIC=False, SEED_INDEX=0, SCALE_IS_BF16=True, BLOCK_R=block_r, BLOCK_C=block_c,
                    num_warps=warps)
            us = time_ms(launch) * 1e3
            lines.append(f"| {rows} x {cols} bf16 | {block_r} x {block_c} | {warps} | {us:.1f} "
                         f"| {x.numel() * 3 / us / 1e3:.0f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


COLUMN_MAJOR_SETTINGS = [(r, c, w) for r, c in ((32, 32), (64, 64), (64, 128), (128, 64), (128, 128), (256, 64),
                                                (64, 256)) for w in (2, 4, 8)]  # (BLOCK_ROWS, BLOCK_COLS, warps)


def column_major_configs_markdown(device: str, m: int) -> str:
    """qt.kernels.layout's copy of row-major int8 codes into the column-major layout (X's codes for grad_weight,
    with grad_weight_sees_quantized_input) at every tile x warps setting of COLUMN_MAJOR_SETTINGS, launched
    directly, on TinyLlama-1.1B's activation shapes; then the copy torch.compile generates for `.t().contiguous()`.
    Each result is checked against torch's. GB/s counts the codes read once and written once."""
    from qt.kernels import layout

    lines = [f"## Column-major copy of int8 codes on {device} (torch {torch.__version__}, triton {triton.__version__})",
             "", "| q | BLOCK_ROWS x BLOCK_COLS | warps | us | GB/s |", "| --- | --- | ---: | ---: | ---: |"]
    for cols in (2048, 5632):
        q = torch.randint(-127, 128, (m, cols), device=DEVICE, dtype=torch.int8)
        out = torch.empty(cols, m, device=DEVICE, dtype=torch.int8).t()
        inductor = torch.compile(lambda t: t.t().contiguous(), fullgraph=True, dynamic=False)

        def kernel_copy(block_rows, block_cols, warps):
            def launch():
                layout._to_column_major_kernel[(triton.cdiv(m, block_rows), triton.cdiv(cols, block_cols))](
                    q, out, m, cols, cols, 1, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps)
                return out
            return launch

        copies = [(f"{r} x {c}", w, kernel_copy(r, c, w)) for r, c, w in COLUMN_MAJOR_SETTINGS]
        for tile, warps, launch in [*copies, ("Inductor's copy", "", lambda: inductor(q).t())]:
            out.zero_()
            ok = torch.equal(launch(), q)
            us = time_ms(launch) * 1e3
            lines.append(f"| {m} x {cols} int8 | {tile} | {warps} | {us:.1f} | {q.numel() * 2 / us / 1e3:.0f}"
                         f"{'' if ok else ' WRONG'} |")
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def launch_overhead_markdown(device: str, m: int) -> str:
    """Host time of one INT8 matmul call, layer by layer of the Gluon op, at a 256 x 256 x 256 shape whose kernel
    takes a few microseconds: a loop of calls is then bound by the host, and its time a call is the host's. Beside
    the op as compiled graphs call it, the same Python kernel behind torch.library.custom_op (the registration
    before round 20), the TMA kernel's eager call, and bf16 torch.mm."""
    size, calls = 256, 2000
    a, b = int8_matrix(size, size, True), int8_matrix(size, size, False)
    row_scale = torch.rand(size, 1, device=DEVICE, dtype=torch.bfloat16) + 0.5
    col_scale = torch.rand(1, size, device=DEVICE, dtype=torch.bfloat16) + 0.5
    out = torch.empty(size, size, device=DEVICE, dtype=torch.bfloat16)
    a_bf16, b_bf16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    via_custom_op = torch.library.custom_op("qt_bench::scaled_int8_mm_gluon", int8_mm_gluon.scaled_int8_mm_gluon,
                                            mutates_args=())
    args = (a, b, row_scale, col_scale, torch.bfloat16)

    def tma_eager():
        chosen = os.environ.get("QT_INT8_MM_KERNEL")
        os.environ["QT_INT8_MM_KERNEL"] = "tma"
        try:
            return scaled_int8_mm(a, b, row_scale, col_scale)
        finally:
            if chosen is None:
                del os.environ["QT_INT8_MM_KERNEL"]
            else:
                os.environ["QT_INT8_MM_KERNEL"] = chosen

    rows = {
        "torch.ops.qt.scaled_int8_mm_gluon (what a compiled graph calls)":
            lambda: torch.ops.qt.scaled_int8_mm_gluon(*args),
        "the same kernel behind torch.library.custom_op": lambda: via_custom_op(*args),
        "int8_mm_gluon.scaled_int8_mm_gluon (the op's Python kernel)":
            lambda: int8_mm_gluon.scaled_int8_mm_gluon(*args),
        "int8_mm_gluon.launch (the Gluon launch alone)": lambda: int8_mm_gluon.launch(
            a, b, row_scale, col_scale, out, int8_mm_gluon.CONFIGS[torch.bfloat16]),
        "scaled_int8_mm with QT_INT8_MM_KERNEL=tma, eager": tma_eager,
        "torch.mm, bf16": lambda: torch.mm(a_bf16, b_bf16),
    }
    lines = [f"## Host time of an INT8 matmul call on {device} (torch {torch.__version__}, "
             f"triton {triton.__version__})",
             "", f"{size} x {size} x {size}, {calls} calls in a loop after 50 warm-up calls, synchronized at its end.",
             "", "| call | us a call |", "| --- | ---: |"]
    for name, call in rows.items():
        for _ in range(50):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
        lines.append(f"| {name} | {(time.perf_counter() - start) / calls * 1e6:.1f} |")
    return "\n".join(lines) + "\n"


FP8_CASTS = [("tensorwise", 1), ("tensorwise", 0), ("rowwise", 1), ("rowwise", 0)]  # (scaling, reduced axis)


def fp8_casts_markdown(device: str, m: int, baseline_path: str | None) -> str:
    """quantize_fp8 to E4M3 compiled by Inductor, as the FP8 recipe runs it (the abs-max, then the cast; axis 0 writes
    the codes transposed), on TinyLlama's activation shapes; beside a baseline version of qt/kernels/fp8.py compiled
    in the same process, where given, with the share of codes that differ. GB/s counts x read once and the codes
    written once (the abs-max reads x a second time)."""
    from qt.kernels import fp8

    torch._dynamo.config.cache_size_limit = 64  # one graph per shape, scaling and axis, of each version
    modules = {"qt": fp8, "baseline": load_baseline(baseline_path)} if baseline_path else {"qt": fp8}
    lines = [f"## FP8 casts compiled by Inductor on {device} (torch {torch.__version__}, triton {triton.__version__})",
             "", "| x | scaling | reduced axis | qt us | qt GB/s | baseline us | codes differing from the baseline |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for cols in (2048, 5632):
        x = torch.randn(m, cols, device=DEVICE, dtype=torch.bfloat16)
        for scaling, axis in FP8_CASTS:
            results = {}
            for name, module in modules.items():
                cast = torch.compile(functools.partial(module.quantize_fp8, axis=axis, scaling=scaling), fullgraph=True,
                                     dynamic=False)
                results[name] = (cast(x)[0].view(torch.uint8), time_ms(lambda: cast(x)) * 1e3)
            (codes, us), baseline = results["qt"], results.get("baseline")
            differing = f"{(codes != baseline[0]).float().mean().item():.2e}" if baseline else ""
            lines.append(f"| {m} x {cols} bf16 | {scaling} | {axis} | {us:.1f} | {x.numel() * 3 / us / 1e3:.0f} "
                         f"| {f'{baseline[1]:.1f}' if baseline else ''} | {differing} |")
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def markdown(device: str, matmuls: list[dict], quantizes: list[dict]) -> str:
    lines = [
        f"## INT8 kernels on {device} (torch {torch.__version__}, triton {triton.__version__})",
        "",
        "scaled_int8_mm (bf16 scales and output) vs torch._int_mm (int32 product only) and bf16 torch.mm; "
        f"{timing()}. The autotuner keys on (M bucket, N, K), not the layout: "
        "every layout of a shape runs the config tuned for the first, K-contiguous one.",
        "",
        "| M x N x K | layout | qt TOP/s | qt config | torch._int_mm TOP/s (operands) | bf16 mm TFLOP/s "
        "| vs torch: rel err, bits differing |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in matmuls:
        check = f"{r['rel_err']:.1e}, {r['mismatched']:.1%} differ" + ("" if r["rel_err"] < MAX_REL_ERR else " FAIL")
        lines.append(
            f"| {r['m']} x {r['n']} x {r['k']} | {r['layout']} | {r['qt_tops']:.0f} | {r['config']} "
            f"| {r['int_mm_tops']:.0f} ({r['int_mm_layout']}) | {r['bf16_tflops']:.0f} | {check} |"
        )
    lines += [
        "",
        "quantize_int8 by rows / by columns, and quantize_int8_rows_and_cols (both), against the same math in "
        "torch ops compiled by Inductor (GB/s counts x read once and every output written once).",
        "",
        "| x | mode | rounding | qt us | qt GB/s | baseline us | Inductor us | Inductor GB/s | qt matches torch "
        "| Inductor matches |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in quantizes:
        rounding = "stochastic" if r["stochastic"] else "nearest"
        lines.append(
            f"| {r['shape'][0]} x {r['shape'][1]} bf16 | {r['mode']} | {rounding} | {r['qt_us']:.1f} "
            f"| {r['qt_gbps']:.0f} | {r['baseline_us']:.1f} | {r['inductor_us']:.1f} | {r['inductor_gbps']:.0f} | {'yes' if r['ok'] else 'NO'} "
            f"| {'yes' if r['inductor_ok'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=16384, help="tokens per matmul (rows of a and of x)")
    parser.add_argument("--quick", action="store_true", help="only the first (N, K) shape and no stochastic rounding")
    parser.add_argument("--quantize_only", action="store_true", help="skip the matmuls")
    parser.add_argument("--baseline",
                        help="another qt/kernels/quantize.py (with --fp8_casts: fp8.py) to time beside this one")
    parser.add_argument("--widths", type=int, nargs="+", help="only the quantize shapes of these widths")
    parser.add_argument("--training_matmuls", action="store_true",
                        help="only a training step's matmuls: INT8 vs FP8 vs bf16")
    parser.add_argument("--model", default="tinyllama-1.1b",
                        help="--training_matmuls: the linears of configs/models/MODEL.json (e.g. llama-120m)")
    parser.add_argument("--mm_kernels", default="auto",
                        help="--training_matmuls: comma-separated QT_INT8_MM_KERNEL values to time, e.g. classic,tma")
    parser.add_argument("--whole_row_configs", action="store_true",
                        help="only the whole-row quantize pass at every rows-a-block x blocks-a-program x warps setting")
    parser.add_argument("--tile_configs", action="store_true",
                        help="only the column-wise tile quantize pass at every tile x warps setting")
    parser.add_argument("--fp8_casts", action="store_true",
                        help="only the FP8 casts compiled by Inductor (with --baseline: an earlier qt/kernels/fp8.py)")
    parser.add_argument("--cuda_graphs", action="store_true",
                        help="time replays of CUDA graphs (no launch overhead); the compiled torch baselines too")
    parser.add_argument("--column_major_configs", action="store_true",
                        help="only the column-major copy of 1-byte codes at every tile x warps setting, and Inductor's")
    parser.add_argument("--launch_overhead", action="store_true",
                        help="only the host time of an INT8 matmul call, through each layer of the Gluon op")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    global CUDA_GRAPHS
    CUDA_GRAPHS = args.cuda_graphs
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    for chosen, table_of, name in ((args.fp8_casts, functools.partial(fp8_casts_markdown, baseline_path=args.baseline),
                                    "fp8_casts"),
                                   (args.whole_row_configs, whole_row_configs_markdown, "whole_row_configs"),
                                   (args.tile_configs, tile_configs_markdown, "tile_configs"),
                                   (args.column_major_configs, column_major_configs_markdown, "column_major_configs"),
                                   (args.launch_overhead, launch_overhead_markdown, "launch_overhead")):
        if chosen:
            table = table_of(device, args.m) + f"\nTimes: {timing()}.\n"
            print(table)
            if out_dir := os.environ.get("OUT"):
                Path(out_dir, f"bench_{name}.md").write_text(table)
            return
    if args.training_matmuls:
        rows = []
        model = json.loads((MODEL_CONFIGS / f"{args.model}.json").read_text())
        hidden, intermediate = model["hidden_size"], model["intermediate_size"]
        for k_in, n_out in [(hidden, hidden), (hidden, intermediate), (intermediate, hidden)]:  # q/o, gate/up, down
            for matmul, shape in TRAINING_MATMULS.items():
                for kernel in args.mm_kernels.split(","):
                    os.environ["QT_INT8_MM_KERNEL"] = kernel
                    rows.append(bench_training_matmul(matmul, *shape(args.m, k_in, n_out)))
                    print(json.dumps(rows[-1]), flush=True)
        table = training_matmuls_markdown(device, args.model, rows)
        print(table)
        if out_dir := os.environ.get("OUT"):
            Path(out_dir, f"bench_training_matmuls_{args.model}.md").write_text(table)
        return

    matmuls = []
    for n, k in [] if args.quantize_only else LLAMA_1B_NK[:1] if args.quick else LLAMA_1B_NK:
        for layout in LAYOUTS:  # the K-contiguous layout first: it is the one the autotuner's pick is for
            matmuls.append(bench_matmul(args.m, n, k, layout))
            print(json.dumps(matmuls[-1]), flush=True)
    baseline = load_baseline(args.baseline) if args.baseline else None
    quantizes = []
    shapes = QUANTIZE_SHAPES[:1] if args.quick else QUANTIZE_SHAPES
    for width, rounding in [s for s in shapes if not args.widths or s[0] in args.widths]:
        x = torch.randn(args.m, width, device=DEVICE, dtype=torch.bfloat16)
        for mode in QUANTIZE_MODES:
            quantizes.append(bench_quantize(x, mode, rounding == "stochastic", baseline))
            print(json.dumps(quantizes[-1]), flush=True)

    table = markdown(device, matmuls, quantizes)
    print(table)
    if out_dir := os.environ.get("OUT"):
        Path(out_dir, "bench_kernels.md").write_text(table)
        results = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
                   "matmul": matmuls, "quantize": quantizes}  # fmt: skip
        Path(out_dir, "bench_kernels.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
