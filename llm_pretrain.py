"""Pretrain a Llama-style language model with a quantized-training recipe.

    python llm_pretrain.py --dataset_dir data/corpus --model tiny --quantize int8_mixed_precision
    torchrun --nproc_per_node 8 llm_pretrain.py --config configs/runs/convergence_120m.yaml
    python llm_pretrain.py --run_dir runs/tiny-int8_mixed_precision --resume

--quantize none is the BF16 baseline. Everything lands in --run_dir: config.yaml, metrics.jsonl,
checkpoints/ (and wandb/ when wandb is installed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from qt.training.checkpoint import resolve_run_config
from qt.training.config import ConfigError, TrainConfig, check_train_flags, flag, one_line_errors, parse_config
from qt.training.data import RandomWindows, TokenShards, validation_batches
from qt.training.distributed import Dist, init_distributed, resolve_dtypes, shutdown_distributed
from qt.training.lifecycle import seed_everything
from qt.training.loop import train
from qt.training.models import (build_causal_lm, decoder_blocks, flops_per_token, next_token_loss,
                                quantize_model, resolve_recipe)
from qt.training.optimizer import parallelize_with_optimizer


@dataclass
class PretrainConfig(TrainConfig):
    dataset_dir: str | None = flag(None, "a tokenize_data.py output folder (required)")
    model: str = flag("tiny", "a config in configs/models/ or a folder with a Hugging Face config.json")
    init_from: str | None = flag(None, "start from these pretrained weights (local folder or Hugging Face "
                                       "name) instead of --model")
    seq_len: int = flag(512, "tokens per training sequence")
    n_tokens: int | None = flag(None, "training tokens; sets --n_steps to n_tokens / (batch_size * seq_len)")
    eval_tokens: int = flag(1_048_576, "validation tokens per evaluation")


def default_run_name(cfg: PretrainConfig) -> str:
    model_name = Path(cfg.init_from).name if cfg.init_from else cfg.model
    return f"{model_name}-{cfg.quantize}"


def check_flags(cfg: PretrainConfig, explicit: set[str], world_size: int) -> PretrainConfig:
    """Settle the derived flags and refuse inconsistent ones, before anything is loaded."""
    if not cfg.dataset_dir:
        raise ConfigError("--dataset_dir is required: a folder made by tokenize_data.py "
                          "(scripts/quickstart.sh makes one from text on this machine)")
    if {"model", "init_from"} <= explicit:
        raise ConfigError("give --model (a fresh model) or --init_from (pretrained weights), not both")
    check_train_flags(cfg, world_size, positive=("seq_len", "eval_tokens"))
    if cfg.n_tokens is not None:
        if "n_steps" in explicit:
            raise ConfigError("give --n_steps or --n_tokens, not both")
        cfg.n_steps = max(1, math.ceil(cfg.n_tokens / (cfg.batch_size * cfg.seq_len)))
    resolve_recipe(cfg)
    return cfg


def pretrain(cfg: PretrainConfig, dist_info: Dist) -> dict:
    device = dist_info.device
    micro_batch_size = cfg.batch_size // (cfg.grad_accum * dist_info.world_size)
    train_shards, val_shards = TokenShards(cfg.dataset_dir, "train"), TokenShards(cfg.dataset_dir, "val")
    batches = RandomWindows(train_shards, cfg.seq_len, cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed,
                            rank=dist_info.rank, world_size=dist_info.world_size, device=device)
    eval_batches = validation_batches(val_shards, cfg.seq_len, cfg.eval_tokens, micro_batch_size,
                                      rank=dist_info.rank, world_size=dist_info.world_size, device=device)

    seed_everything(cfg.seed)
    model = build_causal_lm(cfg.model, cfg.init_from, train_shards.vocab_size, cfg.seq_len, device)
    model_vocab = model.get_input_embeddings().num_embeddings
    if max(train_shards.max_token_id, val_shards.max_token_id) >= model_vocab:
        raise ConfigError(f"the dataset's token ids go up to {train_shards.max_token_id}, beyond the model's "
                          f"vocabulary of {model_vocab}; tokenize the data with the model's tokenizer")
    flops = flops_per_token(model, cfg.seq_len)  # before quantization replaces the Linear layers
    weight_dtype, compute_dtype = resolve_dtypes(cfg.dtype, device)
    if cfg.quantize == "bitnet":
        import qt
        qt.convert_llama_to_bitnet(model)
    model.to(weight_dtype)
    quantize_model(model, cfg)
    training_model, optimizer = parallelize_with_optimizer(model, decoder_blocks(model), cfg, dist_info, compute_dtype)
    if dist_info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{cfg.run_name}: {n_params / 1e6:.1f}M parameters, recipe {cfg.quantize}, {cfg.n_steps} steps of "
              f"{cfg.batch_size} x {cfg.seq_len} tokens on {dist_info.world_size} x {device.type}", flush=True)
    return train(model=training_model, optimizer=optimizer, batches=batches, loss_fn=next_token_loss, cfg=cfg,
                 dist_info=dist_info, tokens_per_step=cfg.batch_size * cfg.seq_len, eval_batches=eval_batches,
                 flops_per_token=flops, weight_dtype=weight_dtype, compute_dtype=compute_dtype)


@one_line_errors
def main(argv=None) -> dict:
    cfg, explicit = parse_config(PretrainConfig, argv, __doc__.split("\n")[0])
    dist_info = init_distributed()
    try:
        cfg = check_flags(resolve_run_config(cfg, explicit, default_run_name), explicit, dist_info.world_size)
        return pretrain(cfg, dist_info)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
