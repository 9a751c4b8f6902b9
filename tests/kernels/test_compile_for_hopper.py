"""qt's Triton and Gluon kernels compiled for a Hopper GPU (sm_90) on a machine without one, by Triton's compiler and
ptxas.

The other kernel tests run the kernels in Triton's CPU interpreter, which executes their Python and never compiles
them (and takes its own branch of the FP8 cast): a kernel it runs correctly can still fail to compile (round 22's
first matmul with a scale per block of K did: a return inside a constexpr branch, then one of another type). Nothing
is launched here; a compile error, or a matmul compiled without wgmma, fails the test. In a process of its own: the
test suite's Triton interpreter replaces `triton.jit` functions with Python ones that the compiler cannot take."""

import json
import os
import subprocess
import sys

import pytest

from tests.kernels.inductor_for_a_gpu import REPO

_SCRIPT = r"""
import inspect, json, re, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource
from qt.kernels import int8_mm, int8_mm_gluon, layout, quantize


def compile_for_hopper(kernel, pointers, constexprs, num_warps, num_stages=3):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    defaults = {n: p.default for n, p in inspect.signature(fn.fn).parameters.items() if p.default is not p.empty}
    constexprs = {**defaults, **constexprs}
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
    source = GluonASTSource if fn is int8_mm_gluon._gluon_scaled_int8_mm_kernel else ASTSource
    return triton.compile(source(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


MM = {"a_ptr": "*i8", "b_ptr": "*i8", "row_scale_ptr": "*bf16", "col_scale_ptr": "*bf16", "out_ptr": "*bf16"}
QUANTIZE = {"x_ptr": "*bf16", "amax_ptr": "*fp32", "q_ptr": "*i8", "scale_ptr": "*bf16", "seed_ptr": "*i64",
            "row_multipliers_ptr": "*bf16"}
cases = {}
for k_block_scaled in (False, True):
    for config in int8_mm._autotune_configs():
        cases[f"classic {config} K_BLOCK_SCALED={k_block_scaled}"] = (
            int8_mm._scaled_int8_mm_kernel, MM, {**config.kwargs, "EVEN_K": False, "K_BLOCK_SCALED": k_block_scaled},
            config.num_warps, config.num_stages, True)
    for config in int8_mm._k_block_tiles(int8_mm._tma_autotune_configs(), {}, K_BLOCK_SCALED=k_block_scaled):
        cases[f"tma {config} K_BLOCK_SCALED={k_block_scaled}"] = (
            int8_mm._persistent_tma_scaled_int8_mm_kernel, MM,
            {**config.kwargs, "PROGRAMS": 132, "K_BLOCK_SCALED": k_block_scaled}, config.num_warps,
            config.num_stages, True)
for rows, tile_amax in ((True, False), (False, False), (False, True)):
    cases[f"tile quantize ROWS={rows} TILE_AMAX={tile_amax}"] = (
        quantize._tile_quantize_kernel, QUANTIZE,
        {"MIN_AMAX": 1e-12, "ROWS": rows, "MULTIPLIED": not rows, "STOCHASTIC": True, "SEED_INDEX": 0,
         "SCALE_IS_BF16": True, "BLOCK_R": 128, "BLOCK_C": 64, "TILE_AMAX": tile_amax}, 8, 1, False)
WHOLE_ROWS = {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*bf16", "seed_ptr": "*i64", "col_amax_ptr": "*fp32",
              "col_row_multipliers_ptr": "*bf16"}
for stochastic in (False, True):  # a linear's dY by rows, folding its columns' maxima (quantize.col_amax_pass_settings)
    block_rows, blocks, warps, stages = quantize.col_amax_pass_settings(16384, 5632, stochastic)
    cases[f"whole rows STOCHASTIC={stochastic}"] = (
        quantize._quantize_whole_rows_kernel, WHOLE_ROWS,
        {"MIN_AMAX": 1e-12, "STOCHASTIC": stochastic, "SCALE_IS_BF16": True, "COL_AMAX": True, "COLS_MULTIPLIED": True,
         "BLOCK_ROWS": block_rows, "BLOCK_COLS": 8192, "BLOCKS_PER_PROGRAM": blocks, "NUM_STAGES": stages}, warps, 1,
        False)
# FP8 codes (qt.kernels.quantize.Codes): the cast the interpreter replaces with its own rounding.
for code_type, largest in (("*fp8e4nv", 448.0), ("*fp8e5", 57344.0)):
    cases[f"whole rows {code_type}"] = (
        quantize._quantize_whole_rows_kernel, {**WHOLE_ROWS, "q_ptr": code_type, "scale_ptr": "*fp32"},
        {"MIN_AMAX": 1e-12, "STOCHASTIC": False, "SCALE_IS_BF16": False, "COL_AMAX": True, "COLS_MULTIPLIED": True,
         "BLOCK_ROWS": 2, "BLOCK_COLS": 2048, "BLOCKS_PER_PROGRAM": 16, "NUM_STAGES": 1, "QMAX": largest,
         "POWER_OF_TWO": True}, 4, 1, False)
    cases[f"tile quantize {code_type}"] = (
        quantize._tile_quantize_kernel, {**QUANTIZE, "q_ptr": code_type, "scale_ptr": "*fp32"},
        {"MIN_AMAX": 1e-12, "ROWS": False, "MULTIPLIED": True, "STOCHASTIC": False, "SEED_INDEX": 0,
         "SCALE_IS_BF16": False, "BLOCK_R": 128, "BLOCK_C": 64, "QMAX": largest, "POWER_OF_TWO": True}, 8, 1, False)
cases["gluon"] = (int8_mm_gluon._gluon_scaled_int8_mm_kernel, MM,
                  {"PROGRAMS": 132, "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "NUM_BUFFERS": 3,
                   "INSTR_N": 128, "num_warps": 8}, 8, 3, True)
cases["column-major copy of codes"] = (
    layout._to_column_major_kernel, {"q_ptr": "*i8", "out_ptr": "*i8"},
    {"BLOCK_ROWS": layout._BLOCK_ROWS, "BLOCK_COLS": layout._BLOCK_COLS}, layout._WARPS, 1, False)
wgmma = {}  # each matmul's wgmma instructions and the wait_group counts it waits for
for name, (kernel, pointers, constexprs, warps, stages, matmul) in cases.items():
    try:
        ptx = compile_for_hopper(kernel, pointers, constexprs, warps, stages).asm["ptx"]
        print(name, "ok" if not matmul or "wgmma" in ptx else "compiled without wgmma")
        if matmul:
            wgmma[name] = {"mma": sorted(set(re.findall(r"wgmma\.mma_async[.\w]*", ptx))),
                           "waits": sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)))}
    except Exception:
        print(name, "FAILED", traceback.format_exc()[-3000:])
print("WGMMA", json.dumps(wgmma))
"""


@pytest.mark.slow  # a process of its own, compiling every tile of the matmuls
def test_kernels_compile_for_hopper(tmp_path):
    # A cache of its own: a kernel compiled before a change to it must not stand in for the changed one.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton_cache"),
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[-1].startswith("WGMMA "), result.stdout[-3000:] + result.stderr[-3000:]
    failures = [line for line in lines[:-1] if not line.endswith(" ok") and not line.startswith(" ")]
    assert not failures, result.stdout[-6000:]
    # Every tile of each matmul kernel; with scales per block of K, those whose K step is a block.
    assert [sum(line.startswith(f"{kernel} ") for line in lines) for kernel in ("classic", "tma")] == [5 + 5, 6 + 3]
    # Why qt/kernels/int8_mm_gluon.py exists: Triton's TMA kernel waits for each int8 wgmma to finish
    # (`wgmma.wait_group 0` only), the Gluon kernel waits inside its K loop only until one is left in flight.
    wgmma = json.loads(lines[-1].removeprefix("WGMMA "))
    int8_wgmma = ["wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8"]
    tma = [found for name, found in wgmma.items() if name.startswith("tma ")]
    assert len(tma) == 9 and all(found["waits"] == ["0"] for found in tma)
    assert all(found["mma"] and all(mma.endswith(".s32.s8.s8") for mma in found["mma"]) for found in tma)
    assert wgmma["gluon"] == {"mma": int8_wgmma, "waits": ["0", "1"]}
