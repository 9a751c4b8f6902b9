"""Fine-tune a timm image model (e.g. a ViT) for classification with a quantized-training recipe.

    python timm_finetune.py --model vit_base_patch16_224.augreg_in21k --dataset resisc45 --quantize int8_mixed_precision
    python timm_finetune.py --model vit_small_patch16_224 --dataset path/to/images --n_epochs 5
    python timm_finetune.py --run_dir runs/vit_base_patch16_224-resisc45-none --resume

A new classifier head is sized to the dataset's classes. --quantize applies to the backbone's linears
(the head too with --quantize_lm_head). RUN_DIR holds config.yaml, metrics.jsonl (loss, val_loss, val_acc,
val_top5, images_per_second, max_memory_allocated_gb) and checkpoints/. A run stopped by Ctrl-C or SIGTERM
saves a checkpoint and exits with status 75: continue it with --run_dir RUN_DIR --resume.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qt.training.checkpoint import place_run, resolve_run_config
from qt.training.config import ConfigError, TrainConfig, check_train_flags, flag, one_line_errors, parse_config
from qt.training.distributed import Dist, all_reduce_sum, check_run_dir_shared, distributed_processes, resolve_dtypes
from qt.training.hub import NOT_CACHED_OFFLINE, hub_offline, use_cache_if_hub_unreachable
from qt.training.image_data import ImageBatches, load_image_datasets, validation_loader
from qt.training.lifecycle import exit_if_stopped, seed_everything
from qt.training.loop import train
from qt.training.models import quantize_model, resolve_recipe
from qt.training.optimizer import parallelize_with_optimizer


@dataclass
class TimmFinetuneConfig(TrainConfig):
    model: str | None = flag(None, "a timm model name, e.g. vit_base_patch16_224.augreg_in21k (required)")
    pretrained: bool = flag(True, "start from the model's pretrained weights (--no-pretrained: random init)")
    checkpoint_path: str | None = flag(None, "load the pretrained weights from this local file instead of the hub")
    model_kwargs: dict = flag({}, "extra timm.create_model arguments as JSON, e.g. '{\"img_size\": 224}'")
    dataset: str = flag("resisc45", "a preset (resisc45), a Hugging Face image dataset name, or a local folder "
                                    "of class_name/*.jpg")
    val_fraction: float = flag(0.1, "local folder: fraction of each class held out for validation")
    augment_kwargs: dict = flag({}, "training augmentation options of timm.data.create_transform as JSON, "
                                    "e.g. '{\"hflip\": 0, \"scale\": [0.5, 1]}'")
    n_epochs: float | None = flag(None, "passes over the training images; sets --n_steps (and evaluates each epoch)")
    num_workers: int = flag(4, "image loading processes")
    # Fine-tuning defaults.
    n_steps: int = flag(1000, "optimizer steps")
    batch_size: int = flag(64, "global batch size (images per optimizer step over all ranks and micro-steps)")
    lr: float = flag(1e-4, "peak learning rate")
    weight_decay: float = flag(0.05, "decoupled weight decay (not applied to norms and biases)")
    betas: list[float] = flag([0.9, 0.999], "Adam betas (two numbers)")
    warmup_steps: int = flag(50, "linear warmup steps")


def default_run_name(cfg: TimmFinetuneConfig) -> str:
    if not cfg.model:
        raise ConfigError("--model is required: a timm model name, e.g. vit_base_patch16_224.augreg_in21k")
    return f"{cfg.model}-{Path(cfg.dataset).name}-{cfg.quantize}"


def check_flags(cfg: TimmFinetuneConfig, explicit: set[str], world_size: int) -> TimmFinetuneConfig:
    check_train_flags(cfg, world_size)
    if cfg.n_epochs is not None and "n_steps" in explicit:
        raise ConfigError("give --n_steps or --n_epochs, not both")
    if cfg.n_epochs is not None and cfg.n_epochs <= 0:
        raise ConfigError("--n_epochs must be positive")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"--val_fraction must be between 0 and 1, not {cfg.val_fraction}")
    if cfg.checkpoint_path and not Path(cfg.checkpoint_path).is_file():
        raise ConfigError(f"--checkpoint_path {cfg.checkpoint_path}: no such file")
    resolve_recipe(cfg)
    return cfg


def import_timm():
    try:
        import timm
    except ImportError as e:
        raise ConfigError(f"timm_finetune.py needs timm and torchvision: `pip install timm` ({e})") from None
    return timm


def build_model(cfg: TimmFinetuneConfig, n_classes: int) -> nn.Module:
    timm = import_timm()
    if not timm.is_model(cfg.model):
        close = timm.list_models(f"*{cfg.model.split('.')[0].split('_')[0]}*")[:5]
        raise ConfigError(f"--model {cfg.model!r} is not a timm model" + (f" (e.g. {', '.join(close)})" if close else ""))
    overlay = {"pretrained_cfg_overlay": {"file": cfg.checkpoint_path}} if cfg.checkpoint_path else {}
    if cfg.pretrained and not cfg.checkpoint_path:
        use_cache_if_hub_unreachable()
    try:
        return timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=n_classes, **overlay,
                                 **cfg.model_kwargs)
    except TypeError as e:
        raise ConfigError(f"--model_kwargs '{json.dumps(cfg.model_kwargs)}': {e}") from None
    except (OSError, RuntimeError) as e:  # no connection to the hub, no such weights, mismatched file
        reason = NOT_CACHED_OFFLINE if hub_offline() and not cfg.checkpoint_path else str(e).splitlines()[0]
        raise ConfigError(f"cannot create --model {cfg.model} with pretrained weights ({reason}); "
                          f"give --checkpoint_path FILE or --no-pretrained") from None


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the longest Sequential / ModuleList of same-type modules (a ViT's `blocks`): units of
    compilation and activation checkpointing."""
    candidates = [list(m) for m in model.modules() if isinstance(m, (nn.Sequential, nn.ModuleList))
                  and len(m) > 1 and len({type(child) for child in m}) == 1]
    if not candidates:
        raise ConfigError(f"cannot find repeated blocks in {type(model).__name__} to compile or checkpoint")
    return max(candidates, key=len)


def classification_loss(model, batch) -> torch.Tensor:
    images, labels = batch
    return nn.functional.cross_entropy(model(images).float(), labels)


def make_evaluate(loader, n_classes: int, dist_info: Dist, dtype: torch.dtype):
    """evaluate(model) -> val_loss, val_acc and (with more than 5 classes) val_top5 over every rank's images."""
    top_k = 5 if n_classes > 5 else None

    @torch.no_grad()
    def evaluate(model) -> dict:
        totals = torch.zeros(4, dtype=torch.float64, device=dist_info.device)  # loss sum, top-1, top-5, images
        for images, labels in loader:
            images, labels = images.to(dist_info.device, dtype), labels.to(dist_info.device)
            logits = model(images).float()
            totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum")
            totals[1] += (logits.argmax(-1) == labels).sum()
            if top_k:
                totals[2] += (logits.topk(top_k, -1).indices == labels[:, None]).any(-1).sum()
            totals[3] += len(labels)
        loss, top1, top5, n = all_reduce_sum(totals).tolist()
        return {"val_loss": loss / n, "val_acc": top1 / n, **({"val_top5": top5 / n} if top_k else {})}
    return evaluate


def finetune(cfg: TimmFinetuneConfig, explicit: set[str], dist_info: Dist) -> dict:
    timm = import_timm()
    device = dist_info.device
    seed_everything(cfg.seed)
    train_set, val_set, classes = load_image_datasets(cfg.dataset, cfg.val_fraction, cfg.seed)
    model = build_model(cfg, len(classes)).to(device)
    data_config = timm.data.resolve_data_config({}, model=model)
    # The pretrained config keeps its image size when --model_kwargs changes it: the model's own size wins.
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size:
        data_config["input_size"] = (3, *img_size)
    try:
        train_set.transform = timm.data.create_transform(**data_config, is_training=True, **cfg.augment_kwargs)
    except TypeError as e:
        raise ConfigError(f"--augment_kwargs '{json.dumps(cfg.augment_kwargs)}': {e}") from None
    val_set.transform = timm.data.create_transform(**data_config)

    weight_dtype, compute_dtype = resolve_dtypes(cfg.dtype, device)
    micro_batch_size = cfg.batch_size // (cfg.grad_accum * dist_info.world_size)
    # Images in the compute dtype: BF16 weights take BF16 inputs (autocast would cast them, but runs only
    # where weights and compute differ).
    batches = ImageBatches(train_set, cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed, rank=dist_info.rank,
                           world_size=dist_info.world_size, num_workers=cfg.num_workers, device=device,
                           dtype=compute_dtype)
    if cfg.n_epochs is not None:
        cfg.n_steps = max(1, math.ceil(cfg.n_epochs * batches.sampler.steps_per_epoch))
        if "eval_interval" not in explicit:
            cfg.eval_interval = batches.sampler.steps_per_epoch
    evaluate = make_evaluate(validation_loader(val_set, micro_batch_size, rank=dist_info.rank,
                                               world_size=dist_info.world_size, num_workers=cfg.num_workers),
                             len(classes), dist_info, compute_dtype)

    model.to(weight_dtype)
    quantize_model(model, cfg, announce=dist_info.is_main)
    training_model, optimizer = parallelize_with_optimizer(model, repeated_blocks(model), cfg, dist_info, compute_dtype)
    if dist_info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{cfg.run_name}: {n_params / 1e6:.1f}M parameters, recipe {cfg.quantize}, {len(classes)} classes, "
              f"{len(train_set)} training / {len(val_set)} validation images at {data_config['input_size'][1:]}, "
              f"{cfg.n_steps} steps of {cfg.batch_size} on {dist_info.world_size} x {device.type}", flush=True)
    record = train(model=training_model, optimizer=optimizer, batches=batches, loss_fn=classification_loss,
                   cfg=cfg, dist_info=dist_info, tokens_per_step=cfg.batch_size, unit="images", evaluate=evaluate,
                   weight_dtype=weight_dtype, compute_dtype=compute_dtype)
    exit_if_stopped(batches, cfg, dist_info)
    return record


@one_line_errors
def main(argv=None) -> dict:
    cfg, explicit = parse_config(TimmFinetuneConfig, argv, __doc__.split("\n")[0])
    with distributed_processes() as dist_info:
        cfg = place_run(cfg, default_run_name)
        check_run_dir_shared(cfg.run_dir, dist_info)
        cfg = check_flags(resolve_run_config(cfg, explicit, default_run_name), explicit, dist_info.world_size)
        return finetune(cfg, explicit, dist_info)


if __name__ == "__main__":
    main()
