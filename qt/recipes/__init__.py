from qt.recipes.bitnet import BitNetConfig, BitNetTernaryWeight, BitNetWeight, convert_llama_to_bitnet
from qt.recipes.int8_mixed_precision import Int8MixedPrecisionConfig, Int8MixedPrecisionWeight
from qt.recipes.int8_weight_only import Int8WeightOnlyConfig, Int8WeightOnlyWeight

RECIPES = {
    config.name: config for config in (Int8WeightOnlyConfig, Int8MixedPrecisionConfig, BitNetConfig)
}

__all__ = [
    "RECIPES",
    "BitNetConfig",
    "BitNetTernaryWeight",
    "BitNetWeight",
    "Int8MixedPrecisionConfig",
    "Int8MixedPrecisionWeight",
    "Int8WeightOnlyConfig",
    "Int8WeightOnlyWeight",
    "convert_llama_to_bitnet",
]
