"""Tiny Hugging Face Llama models for tests (built from a config: nothing is downloaded)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab_size: int = 128, tie_word_embeddings: bool = False, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": tie_word_embeddings, **overrides,
    })  # fmt: skip
    return LlamaForCausalLM(config)
