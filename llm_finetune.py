"""Fine-tune a pretrained causal language model on instruction data with a quantized-training recipe.

    python llm_finetune.py --model HuggingFaceTB/SmolLM-1.7B --dataset metamathqa --quantize int8_mixed_precision
    python llm_finetune.py --model path/to/model --dataset data.jsonl --prompt_field question --response_field answer
    python llm_finetune.py --run_dir runs/SmolLM-1.7B-metamathqa-int8_mixed_precision --resume

The loss covers the response tokens only. RUN_DIR holds config.yaml, metrics.jsonl, checkpoints/ (the
quantized state, for --resume) and, once the run completes, hf_model/: the trained model with its tokenizer,
for qt.training.export.load_finetuned (and, but for bitnet, transformers' from_pretrained); neither is
written with --no-save_checkpoints. A run stopped by Ctrl-C or SIGTERM saves a checkpoint and exits with
status 75: continue it with --run_dir RUN_DIR --resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from qt.training.checkpoint import place_run, resolve_run_config
from qt.training.config import ConfigError, TrainConfig, check_train_flags, flag, one_line_errors, parse_config
from qt.training.distributed import Dist, check_run_dir_shared, distributed_processes, resolve_dtypes
from qt.training.export import EXPORT_DIR, export_finetuned
from qt.training.instruct_data import (ALPACA_TEMPLATE, InstructBatches, load_records, preset_fields,
                                       response_loss, split_validation, tokenize_examples, validation_batches)
from qt.training.lifecycle import exit_if_stopped, seed_everything
from qt.training.loop import train
from qt.training.models import (decoder_blocks, flops_per_token, load_pretrained_causal_lm, load_pretrained_config,
                                load_tokenizer, quantize_model, resolve_recipe)
from qt.training.optimizer import parallelize_with_optimizer


@dataclass
class FinetuneConfig(TrainConfig):
    model: str | None = flag(None, "pretrained causal LM: a Hugging Face name (e.g. HuggingFaceTB/SmolLM-1.7B) "
                                   "or a local folder (required)")
    dataset: str = flag("metamathqa", "instruction data: a preset (metamathqa), a Hugging Face dataset name, or "
                                      "a local .json/.jsonl/.parquet file")
    prompt_field: str | None = flag(None, "field holding the prompt (default: the preset's, e.g. query)")
    response_field: str | None = flag(None, "field holding the response (default: the preset's, e.g. response)")
    prompt_template: str = flag(ALPACA_TEMPLATE, "text around the prompt; {prompt} marks where it goes")
    max_seq_len: int = flag(512, "examples are truncated to this many tokens (prompt + response), at most the "
                                 "model's positions")
    val_examples: int = flag(200, "examples held out for the validation loss")
    freeze_embedding_layer: bool = flag(False, "do not train the input embedding (nor a head tied to it)")
    # Fine-tuning defaults: a small LR, short warmup, mild decay, evaluated more often than pretraining.
    n_steps: int = flag(500, "optimizer steps")
    batch_size: int = flag(16, "global batch size (examples per optimizer step over all ranks and micro-steps)")
    lr: float = flag(2e-5, "peak learning rate")
    weight_decay: float = flag(0.0, "decoupled weight decay (not applied to norms and biases)")
    betas: list[float] = flag([0.9, 0.999], "Adam betas (two numbers)")
    warmup_steps: int = flag(20, "linear warmup steps")
    eval_interval: int = flag(50, "steps between validation losses (0: only at the end)")


def default_run_name(cfg: FinetuneConfig) -> str:
    if not cfg.model:
        raise ConfigError("--model is required: a Hugging Face causal LM name (e.g. HuggingFaceTB/SmolLM-1.7B) "
                          "or a local folder")
    return f"{Path(cfg.model).name}-{Path(cfg.dataset).stem}-{cfg.quantize}"


def check_flags(cfg: FinetuneConfig, world_size: int) -> FinetuneConfig:
    """Settle the derived flags and refuse inconsistent ones, before anything is loaded."""
    check_train_flags(cfg, world_size, positive=("max_seq_len", "val_examples"))
    preset = preset_fields(cfg.dataset)
    if preset:
        cfg.prompt_field, cfg.response_field = cfg.prompt_field or preset[0], cfg.response_field or preset[1]
    if not (cfg.prompt_field and cfg.response_field):
        raise ConfigError(f"--dataset {cfg.dataset} is not a preset: pass --prompt_field and --response_field "
                          f"(the names of its prompt and response fields)")
    if "{prompt}" not in cfg.prompt_template:
        raise ConfigError("--prompt_template must contain {prompt} where the prompt goes")
    resolve_recipe(cfg)
    return cfg


def prepare_model(model: nn.Module, cfg: FinetuneConfig, announce: bool = False) -> None:
    """Untie a tied LM head that is to be quantized (the embedding stays in high precision and the head is
    quantized once), freeze the embedding if asked, and apply the recipe."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if cfg.quantize_lm_head and head is not None and head.weight is embedding.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    if cfg.freeze_embedding_layer:
        embedding.weight.requires_grad_(False)
    quantize_model(model, cfg, announce=announce, bitnet_surgery=True)


def finetune(cfg: FinetuneConfig, dist_info: Dist) -> dict:
    device = dist_info.device
    micro_batch_size = cfg.batch_size // (cfg.grad_accum * dist_info.world_size)
    weight_dtype, compute_dtype = resolve_dtypes(cfg.dtype, device)
    seed_everything(cfg.seed)
    max_seq_len = capped_max_seq_len(cfg, load_pretrained_config(cfg.model, "model"), dist_info)
    tokenizer = load_tokenizer(cfg.model, "model")
    examples, dropped = tokenize_examples(load_records(cfg.dataset), tokenizer, prompt_field=cfg.prompt_field,
                                          response_field=cfg.response_field, template=cfg.prompt_template,
                                          max_seq_len=max_seq_len)
    train_examples, val_examples = split_validation(examples, cfg.val_examples, cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = InstructBatches(train_examples, cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed,
                              rank=dist_info.rank, world_size=dist_info.world_size, pad_id=pad_id, device=device)
    eval_batches = validation_batches(val_examples, micro_batch_size, rank=dist_info.rank,
                                      world_size=dist_info.world_size, pad_id=pad_id, device=device)

    model = load_pretrained_causal_lm(cfg.model, "model", device, weight_dtype)
    mean_length = sum(len(e.tokens) for e in train_examples) / len(train_examples)
    flops = flops_per_token(model, round(mean_length))  # before quantization replaces the Linear layers
    prepare_model(model, cfg, announce=dist_info.is_main)
    training_model, optimizer = parallelize_with_optimizer(model, decoder_blocks(model), cfg, dist_info, compute_dtype)
    if dist_info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{cfg.run_name}: {n_params / 1e6:.1f}M parameters, recipe {cfg.quantize}, {len(train_examples)} "
              f"training / {len(val_examples)} validation examples (mean {mean_length:.0f} tokens"
              + (f"; {dropped} dropped: prompt longer than --max_seq_len" if dropped else "")
              + f"), {cfg.n_steps} steps of {cfg.batch_size} on {dist_info.world_size} x {device.type}", flush=True)
    record = train(model=training_model, optimizer=optimizer, batches=batches, loss_fn=response_loss, cfg=cfg,
                   dist_info=dist_info, count_tokens=lambda batch: batch["n_tokens"], eval_batches=eval_batches,
                   flops_per_token=flops, weight_dtype=weight_dtype, compute_dtype=compute_dtype)
    exit_if_stopped(batches, cfg, dist_info, unwritten=f"{EXPORT_DIR}/")  # a partly trained model is not exported
    if cfg.save_checkpoints:
        export_finetuned(training_model, tokenizer, Path(cfg.run_dir) / EXPORT_DIR, dist_info, recipe=cfg.quantize,
                         include_head=cfg.quantize_lm_head, weight_dtype=weight_dtype)
    return record


def capped_max_seq_len(cfg: FinetuneConfig, model_config, dist_info: Dist) -> int:
    """--max_seq_len, or the model's positions where it has fewer (with a note). The saved config keeps the
    flag as given, so the same command resumes the run."""
    max_positions = getattr(model_config, "max_position_embeddings", None) or cfg.max_seq_len
    if cfg.max_seq_len > max_positions and dist_info.is_main:
        print(f"note: --max_seq_len {cfg.max_seq_len} exceeds the model's {max_positions} positions: examples "
              f"are truncated to {max_positions} tokens", flush=True)
    return min(cfg.max_seq_len, max_positions)


@one_line_errors
def main(argv=None) -> dict:
    cfg, explicit = parse_config(FinetuneConfig, argv, __doc__.split("\n")[0])
    with distributed_processes() as dist_info:
        cfg = place_run(cfg, default_run_name)
        check_run_dir_shared(cfg.run_dir, dist_info)
        cfg = check_flags(resolve_run_config(cfg, explicit, default_run_name), dist_info.world_size)
        return finetune(cfg, dist_info)


if __name__ == "__main__":
    main()
