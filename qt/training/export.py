"""Export a trained (possibly quantized) Hugging Face model as a plain BF16 checkpoint that
`from_pretrained` loads, for evaluation with the usual tools. The run's own checkpoints keep the
quantized state for resuming."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from qt.training.distributed import Dist, unwrap


def dequantized_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's full state with quantized weights dequantized and floating tensors cast to `dtype`.
    Under FSDP2 every rank must call it: the shards are all-gathered."""
    import qt
    state = {}
    for name, tensor in unwrap(model).state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if isinstance(tensor, qt.QuantizedWeight):
            tensor = tensor.dequantize()
        state[name] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
    return state


def export_pretrained(model: nn.Module, tokenizer, output_dir: Path, dist_info: Dist) -> None:
    """Write `model` (a transformers PreTrainedModel) and its tokenizer to output_dir as BF16 safetensors."""
    state = dequantized_state_dict(model, torch.bfloat16)
    if not dist_info.is_main:
        return
    hf_model = unwrap(model)
    hf_model.config.dtype = torch.bfloat16
    hf_model.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
