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

from qt.training.checkpoint import place_run, resolve_run_config
from qt.training.config import ConfigError, TrainConfig, check_train_flags, flag, one_line_errors, parse_config
from qt.training.data import RandomWindows, TokenShards, validation_batches
from qt.training.distributed import Dist, check_run_dir_shared, distributed_processes, resolve_dtypes
from qt.training.lifecycle import exit_if_stopped, seed_everything
from qt.training.loop import train
from qt.training.models import (build_causal_lm, decoder_blocks, flops_per_token, load_model_config,
                                load_pretrained_config, next_token_loss, quantize_model, resolve_recipe)
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
    if cfg.n_tokens is not None:  # --n_steps first: the common checks compare --warmup_steps with it
        if "n_steps" in explicit:
            raise ConfigError("give --n_steps or --n_tokens, not both")
        if min(cfg.n_tokens, cfg.batch_size, cfg.seq_len) < 1:
            raise ConfigError("--n_tokens, --batch_size and --seq_len must be at least 1")
        cfg.n_steps = max(1, math.ceil(cfg.n_tokens / (cfg.batch_size * cfg.seq_len)))
    check_train_flags(cfg, world_size, positive=("seq_len", "eval_tokens"))
    resolve_recipe(cfg)
    return cfg


def pretrained_vocab_size(cfg: PretrainConfig) -> int | None:
    """Check that the model exists (reading its config only): the vocabulary size of --init_from's model,
    or None for a fresh --model, whose vocabulary is sized to the dataset."""
    if not cfg.init_from:
        load_model_config(cfg.model, cfg.seq_len)
        return None
    return load_pretrained_config(cfg.init_from, "init_from").vocab_size


def load_data(cfg: PretrainConfig, dist_info: Dist, model_vocab_size: int | None) -> tuple:
    """(training shards, training batches, validation batches), checked against the flags and the model."""
    train_shards, val_shards = TokenShards(cfg.dataset_dir, "train"), TokenShards(cfg.dataset_dir, "val")
    if model_vocab_size is not None:
        for shards in (train_shards, val_shards):
            shards.check_vocabulary(model_vocab_size)
    micro_batch_size = cfg.batch_size // (cfg.grad_accum * dist_info.world_size)
    batches = RandomWindows(train_shards, cfg.seq_len, cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed,
                            rank=dist_info.rank, world_size=dist_info.world_size, device=dist_info.device)
    eval_batches = validation_batches(val_shards, cfg.seq_len, cfg.eval_tokens, micro_batch_size,
                                      rank=dist_info.rank, world_size=dist_info.world_size, device=dist_info.device)
    return train_shards, batches, eval_batches


def pretrain(cfg: PretrainConfig, dist_info: Dist, data: tuple) -> dict:
    device = dist_info.device
    train_shards, batches, eval_batches = data
    seed_everything(cfg.seed)
    model = build_causal_lm(cfg.model, cfg.init_from, train_shards.vocab_size, cfg.seq_len, device)
    flops = flops_per_token(model, cfg.seq_len)  # before quantization replaces the Linear layers
    weight_dtype, compute_dtype = resolve_dtypes(cfg.dtype, device)
    model.to(weight_dtype)
    quantize_model(model, cfg, announce=dist_info.is_main, bitnet_surgery=True)
    training_model, optimizer = parallelize_with_optimizer(model, decoder_blocks(model), cfg, dist_info, compute_dtype)
    if dist_info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{cfg.run_name}: {n_params / 1e6:.1f}M parameters, recipe {cfg.quantize}, {cfg.n_steps} steps of "
              f"{cfg.batch_size} x {cfg.seq_len} tokens on {dist_info.world_size} x {device.type}", flush=True)
    record = train(model=training_model, optimizer=optimizer, batches=batches, loss_fn=next_token_loss, cfg=cfg,
                   dist_info=dist_info, tokens_per_step=cfg.batch_size * cfg.seq_len, eval_batches=eval_batches,
                   flops_per_token=flops, weight_dtype=weight_dtype, compute_dtype=compute_dtype)
    exit_if_stopped(batches, cfg, dist_info)  # as the fine-tuning scripts: a job script tells a stopped run
    return record


@one_line_errors
def main(argv=None) -> dict:
    cfg, explicit = parse_config(PretrainConfig, argv, __doc__.split("\n")[0])
    with distributed_processes() as dist_info:
        cfg = place_run(cfg, default_run_name)
        check_run_dir_shared(cfg.run_dir, dist_info)
        if cfg.resume:  # continue with the saved run's config, checked below like a new one
            cfg = resolve_run_config(cfg, explicit, default_run_name)
        # Flags, then the model, then the data; the run directory last, when the run could start.
        cfg = check_flags(cfg, explicit, dist_info.world_size)
        data = load_data(cfg, dist_info, pretrained_vocab_size(cfg))
        if not cfg.resume:  # refuses to start over an existing run
            cfg = resolve_run_config(cfg, explicit, default_run_name)
        return pretrain(cfg, dist_info, data)


if __name__ == "__main__":
    main()
