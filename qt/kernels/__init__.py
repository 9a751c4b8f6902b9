"""INT8 kernels: fused abs-max quantization and scaled INT8 matmul (Triton on CUDA, torch on CPU)."""

from qt.kernels.int8_mm import scaled_int8_mm
from qt.kernels.quantize import quantize_int8, quantize_int8_rows_and_cols

__all__ = ["quantize_int8", "quantize_int8_rows_and_cols", "scaled_int8_mm"]
