"""Quantization kernels: fused abs-max INT8 quantization, scaled INT8 matmul and INT8 or FP8 codes copied
column-major (Triton on CUDA, torch on CPU); FP8 casts in torch ops and the scaled FP8 matmul (torch._scaled_mm on
FP8 GPUs, emulated elsewhere)."""

from qt.kernels.fp8 import quantize_fp8, scaled_fp8_mm
from qt.kernels.int8_mm import scaled_int8_mm
from qt.kernels.layout import to_column_major
from qt.kernels.quantize import quantize_int8, quantize_int8_rows_and_cols, quantize_int8_rows_keeping_col_amax

__all__ = ["quantize_fp8", "quantize_int8", "quantize_int8_rows_and_cols", "quantize_int8_rows_keeping_col_amax",
           "scaled_fp8_mm", "scaled_int8_mm", "to_column_major"]
