"""Export a fine-tuned (possibly quantized) Hugging Face causal LM for evaluation and generation, and load
it back. The run's own checkpoints keep the quantized state for resuming.

RUN_DIR/hf_model/ holds the tokenizer, config.json (whose `dtype` is the saved tensors') and

- for every recipe but bitnet, `model.safetensors`: the weights dequantized to BF16, a plain checkpoint
  that transformers' `AutoModelForCausalLM.from_pretrained` loads;
- for bitnet, which changes the architecture (an RMSNorm before each linear of the decoder layers with a
  BitNet linear, whose keys show which layers those are), `bitnet.safetensors`: the converted model's latent
  weights in the training weight dtype (each forward ternarizes them, and rounding them to BF16 could flip
  ternary values), and `qt_recipe` in config.json (the recipe and the linears it quantized: on a GPU the
  small-layer rule left some in BF16, and a CPU would quantize them all). transformers alone cannot load it
  (it finds no model.safetensors): `load_finetuned` rebuilds the BitNet model.

    from qt.training.export import load_finetuned
    model, tokenizer = load_finetuned("runs/RUN_NAME")  # either kind
    output = model.generate(**tokenizer("Q: ...", return_tensors="pt"), max_new_tokens=32)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from qt.training.distributed import Dist, unwrap

EXPORT_DIR = "hf_model"
BITNET_WEIGHTS = "bitnet.safetensors"


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


def export_finetuned(model: nn.Module, tokenizer, output_dir: Path, dist_info: Dist, *, recipe: str,
                     include_head: bool, weight_dtype: torch.dtype) -> None:
    """Write `model` (a transformers PreTrainedModel trained with `recipe`) and its tokenizer to output_dir
    (see the module docstring). Written beside it and renamed: an interrupted export leaves no folder that
    looks complete. Under FSDP2 every rank must call it."""
    bitnet = recipe == "bitnet"
    dtype = weight_dtype if bitnet else torch.bfloat16
    state = dequantized_state_dict(model, dtype)
    if not dist_info.is_main:
        return
    hf_model = unwrap(model)
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if bitnet:
        from safetensors.torch import save_file
        tmp.mkdir(parents=True)
        save_file(_unshared(state), tmp / BITNET_WEIGHTS, metadata={"format": "pt"})
        # The linears the run quantized, by name: the size rule of quantize_ depends on the device it ran on.
        quantized = [name for name, m in hf_model.named_modules() if getattr(m, "qt_recipe", None) is not None]
        hf_model.config.qt_recipe = {"name": recipe, "include_head": include_head, "linears": quantized}
    else:
        hf_model.save_pretrained(tmp, state_dict=state)
    # save_pretrained writes the in-memory model's dtype into config.json (FP32 weights on a CPU), not the
    # dtype of the tensors it saved: the config is written again with theirs.
    hf_model.config.dtype = dtype
    hf_model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(output_dir, ignore_errors=True)
    tmp.rename(output_dir)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (a head tied to the embedding): copies for the repeats."""
    seen, out = set(), {}
    for name, tensor in state.items():
        out[name] = tensor.clone() if tensor.data_ptr() in seen else tensor.contiguous()
        seen.add(tensor.data_ptr())
    return out


def load_finetuned(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) from an llm_finetune.py export: RUN_DIR/hf_model or the RUN_DIR holding it. The
    model is in eval mode on `device`, ready for evaluation and `model.generate`. A BitNet export is rebuilt
    as it was trained (the same layers converted, the same linears quantized with the bitnet recipe, so every
    forward ternarizes the latent weights), wherever it is loaded: its logits are those of the trained model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder = Path(path)
    if (folder / EXPORT_DIR).is_dir():
        folder = folder / EXPORT_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no fine-tuned model (an {EXPORT_DIR}/ folder with a config.json); "
                                f"llm_finetune.py writes RUN_DIR/{EXPORT_DIR}/ when a run completes")
    config = AutoConfig.from_pretrained(folder)
    recipe = getattr(config, "qt_recipe", None)
    if recipe is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    else:
        import qt
        from safetensors.torch import load_file
        dtype = getattr(torch, config.dtype) if isinstance(config.dtype, str) else config.dtype
        from qt.recipes.bitnet import converted_layers
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = load_file(folder / BITNET_WEIGHTS)
        # The layers the run converted (on a GPU, those with a BitNet linear), as the saved keys show.
        qt.convert_llama_to_bitnet(model, layers=converted_layers(state))
        model.load_state_dict(state)
        if "linears" in recipe:
            quantized = set(recipe["linears"])
            qt.quantize_(model, recipe["name"], filter_fn=lambda module, name: name in quantized)
        else:  # exported before the names were recorded, when every linear but perhaps the head was quantized
            qt.quantize_(model, recipe["name"], include_head=recipe["include_head"], min_shape=None)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(folder)
