"""qt: quantized-training recipes for PyTorch.

    import qt
    qt.quantize_(model, "int8_mixed_precision")
"""

from qt import optim
from qt.config import RecipeConfig
from qt.quantize import (SMALL_LINEAR_MIN_SHAPE, MinShape, inductor_options, quantization_summary, quantize_,
                         resolve_recipe)
from qt.sqnr import forward_sqnr
from qt.recipes import (
    RECIPES,
    BitNetConfig,
    Fp8MixedPrecisionConfig,
    Int8MixedPrecisionConfig,
    Int8WeightOnlyConfig,
    convert_llama_to_bitnet,
)
from qt.subclass import QuantizedWeight, prepare_all_gathers

__all__ = [
    "RECIPES",
    "SMALL_LINEAR_MIN_SHAPE",
    "BitNetConfig",
    "Fp8MixedPrecisionConfig",
    "Int8MixedPrecisionConfig",
    "Int8WeightOnlyConfig",
    "MinShape",
    "QuantizedWeight",
    "RecipeConfig",
    "convert_llama_to_bitnet",
    "forward_sqnr",
    "inductor_options",
    "quantization_summary",
    "quantize_",
    "prepare_all_gathers",
    "optim",
    "resolve_recipe",
]
