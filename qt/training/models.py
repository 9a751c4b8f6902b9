"""Models: quantizing one with a qt recipe, and Hugging Face causal language models built from a
named config in configs/models/ or a local folder."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from qt.training.config import ConfigError, is_baseline
from qt.training.hub import hub_error, is_local_path, use_cache_if_hub_unreachable

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
VOCAB_MULTIPLE = 64  # embedding and output rows padded to a multiple of this: friendlier matmul shapes


def model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def load_model_config(model: str, seq_len: int):
    """The transformers config of a named model (configs/models/NAME.json) or a local folder's config.json."""
    from transformers import AutoConfig
    named = MODEL_CONFIG_DIR / f"{model}.json"
    if named.is_file():
        values = json.loads(named.read_text())
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    elif (Path(model) / "config.json").is_file():
        config = AutoConfig.from_pretrained(model)
    else:
        raise ConfigError(f"--model {model!r} is neither a config in configs/models/ ({', '.join(model_names())}) "
                          f"nor a folder with a config.json")
    config.max_position_embeddings = max(config.max_position_embeddings, seq_len)
    return config


def build_causal_lm(model: str, init_from: str | None, vocab_size: int, seq_len: int, device) -> nn.Module:
    """A fresh model of config `model` with a vocabulary of `vocab_size` (padded), or the pretrained
    model `init_from` (a local folder or a Hugging Face name)."""
    from transformers import AutoModelForCausalLM
    if init_from:
        return load_pretrained_causal_lm(init_from, "init_from", device, torch.float32)
    config = load_model_config(model, seq_len)
    config.vocab_size = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def load_pretrained_causal_lm(name: str, flag_name: str, device, dtype: torch.dtype) -> nn.Module:
    """A pretrained Hugging Face causal LM (local folder or hub name, given as --flag_name), loaded
    directly in `dtype`: a 1.7B model in BF16 never exists in FP32 in memory."""
    from transformers import AutoModelForCausalLM
    lm = from_pretrained(lambda: AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa", dtype=dtype),
                         name, flag_name, "the weights")
    return lm.to(device, dtype)


def load_pretrained_config(name: str, flag_name: str):
    """The transformers config of a pretrained model (local folder or hub name, given as --flag_name)."""
    from transformers import AutoConfig
    return from_pretrained(lambda: AutoConfig.from_pretrained(name), name, flag_name, "the config")


def load_tokenizer(name: str, flag_name: str):
    """The tokenizer of a pretrained model (local folder or hub name, given as --flag_name)."""
    from transformers import AutoTokenizer
    return from_pretrained(lambda: AutoTokenizer.from_pretrained(name), name, flag_name, "the tokenizer")


def from_pretrained(load, name: str, flag_name: str, part: str):
    """load() of `part` of the model --flag_name NAME, a local folder or a hub name, with a one-line error
    that says what to do: a missing folder or one without a model's config.json fails before load(), a
    hub name fails in seconds where the hub cannot be reached (see qt.training.hub)."""
    local = Path(name).is_dir()
    if local and not (Path(name) / "config.json").is_file():
        only_tokenizer = " (only a tokenizer)" if (Path(name) / "tokenizer_config.json").is_file() else ""
        raise ConfigError(f"--{flag_name} {name} holds no config.json{only_tokenizer}: give the folder of a "
                          f"Hugging Face model, with its config.json, weights and tokenizer")
    if not local and is_local_path(name):
        raise ConfigError(f"--{flag_name} {name}: " + ("is a file: give the folder that holds the model"
                                                         if Path(name).exists() else "no such folder"))
    if not local:
        use_cache_if_hub_unreachable()
    try:
        return load()
    except (OSError, ValueError) as e:
        if local:
            raise ConfigError(f"cannot load {part} of --{flag_name} {name} ({str(e).splitlines()[0]}); give the "
                              f"folder of a Hugging Face model, with its config.json, weights and tokenizer") from None
        raise hub_error(f"{part} of --{flag_name} {name!r}", e,
                        "give a local folder, or check the name and the network") from None


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: units of sharding, compilation and activation checkpointing."""
    block_types = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_types]
    if not blocks:
        raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__}")
    return blocks


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per matmul weight plus causal attention's
    12 * layers * width * seq_len (PaLM appendix B). Count before quantization replaces the Linears."""
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    config = model.config
    return 6 * matmul_weights + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    logits = model(input_ids=inputs, use_cache=False).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def resolve_recipe(cfg):
    """The qt recipe config for --quantize and --quantize_kwargs (None for the baseline), so that a bad
    name or option fails in a line before any model is built."""
    if is_baseline(cfg.quantize):
        if cfg.quantize_kwargs:
            raise ConfigError("--quantize_kwargs needs a recipe: pass --quantize NAME")
        return None
    import qt
    with _recipe_errors(cfg):
        return qt.resolve_recipe(cfg.quantize, **cfg.quantize_kwargs)


def quantize_model(model: nn.Module, cfg, announce: bool = False, *, bitnet_surgery: bool = False) -> None:
    """Apply the recipe --quantize in place (nothing for the baseline); `announce` prints which linears
    were quantized and which were left in high precision. `bitnet_surgery` (a Llama causal LM): with bitnet, then
    convert the decoder layers that have a BitNet linear (qt.convert_llama_to_bitnet), the others staying plain."""
    recipe = resolve_recipe(cfg)
    if recipe is not None and cfg.quantize_lm_head and getattr(model.config, "tie_word_embeddings", False):
        raise ConfigError(
            "--quantize_lm_head: this model ties its LM head to the input embedding (tie_word_embeddings), "
            "and quantizing the head would untie them; drop the flag or use a model config with "
            "tie_word_embeddings false"
        )
    if recipe is None:
        return
    import qt
    with _recipe_errors(cfg):
        qt.quantize_(model, recipe, include_head=cfg.quantize_lm_head,
                     min_shape=None if cfg.quantize_small_linears else "auto")
        summary = qt.quantization_summary(model)  # before the surgery, which nests the linears it converts
        if "too small for" in summary:
            summary += " (--quantize_small_linears quantizes them too)"
        if bitnet_surgery and recipe.name == "bitnet":
            qt.convert_llama_to_bitnet(model)
            summary += f"; {_bitnet_layers_summary(model)}"
    if announce:
        print(f"{cfg.run_name}: {summary}", flush=True)


def _bitnet_layers_summary(model: nn.Module) -> str:
    from qt.recipes.bitnet import converted_layers
    converted, total = len(converted_layers(model.state_dict())), model.config.num_hidden_layers
    plain = f" ({total - converted} with no BitNet linear stay plain Llama layers)" if converted < total else ""
    return f"BitNet's SubLN in {converted} of {total} decoder layers{plain}"


@contextmanager
def _recipe_errors(cfg):
    """qt reports a bad recipe, option or layer as ValueError / TypeError: make it a one-line error."""
    try:
        yield
    except (ValueError, TypeError) as e:
        kwargs = f" --quantize_kwargs '{json.dumps(cfg.quantize_kwargs)}'" if cfg.quantize_kwargs else ""
        raise ConfigError(f"--quantize {cfg.quantize}{kwargs}: {e}") from None
