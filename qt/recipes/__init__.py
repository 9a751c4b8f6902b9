from qt.recipes.bitnet import BitNetConfig, BitNetTernaryWeight, BitNetWeight, convert_llama_to_bitnet
from qt.recipes.fp8_mixed_precision import Fp8MixedPrecisionConfig, Fp8MixedPrecisionWeight
from qt.recipes.int8_mixed_precision import Int8MixedPrecisionConfig, Int8MixedPrecisionWeight
from qt.recipes.int8_weight_only import Int8WeightOnlyConfig, Int8WeightOnlyWeight
from qt.recipes.master_weight import GatheredWeight, MasterWeight

RECIPES = {
    config.name: config
    for config in (Int8WeightOnlyConfig, Int8MixedPrecisionConfig, Fp8MixedPrecisionConfig, BitNetConfig)
}

__all__ = [
    "RECIPES",
    "BitNetConfig",
    "BitNetTernaryWeight",
    "BitNetWeight",
    "Fp8MixedPrecisionConfig",
    "Fp8MixedPrecisionWeight",
    "GatheredWeight",
    "Int8MixedPrecisionConfig",
    "Int8MixedPrecisionWeight",
    "Int8WeightOnlyConfig",
    "Int8WeightOnlyWeight",
    "MasterWeight",
    "convert_llama_to_bitnet",
]
