"""Flags and YAML run configs.

Every field of a config dataclass is a command-line flag of the same name. `--config FILE.yaml` sets
fields from a file and command-line flags override it. The run directory keeps the resolved config
(`config.yaml`) so that `--resume` can continue a run from its directory alone, and refuses to continue
one whose settings changed (the continued loss curve would silently differ from the original run).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class TrainingError(Exception):
    """An error whose one-line message says what to do; entry points print it without a traceback."""


class ConfigError(TrainingError, ValueError):
    """A bad flag, file or combination of settings."""


def flag(default, help: str, choices: tuple | None = None):
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Flags common to every training entry point (pretraining, fine-tuning)."""

    # Run directory and logging
    run_dir: str | None = flag(None, "directory for config, metrics.jsonl, checkpoints (default runs/RUN_NAME)")
    run_name: str | None = flag(None, "name of the run (default derived from the model and recipe)")
    resume: bool = flag(False, "continue the run in --run_dir from its last checkpoint (starts fresh if it has none); "
                               "the flags it may change: the logging and checkpoint ones, and (e.g. after a "
                               "divergence) --lr, --clip_grad_norm, --warmup_steps, --schedule, --decay_fraction, "
                               "--min_lr_ratio")
    wandb: str = flag("auto", "wandb mode; auto = online if an API key is configured, else offline",
                      ("auto", "online", "offline", "disabled"))
    project: str = flag("qt", "wandb project")
    log_interval: int = flag(10, "steps between metrics.jsonl lines")
    eval_interval: int = flag(100, "steps between validation losses (0: only at the end)")
    ckpt_interval: int = flag(500, "steps between checkpoints (0: only at the end and on Ctrl-C/SIGTERM)")
    keep_checkpoints: int = flag(1, "how many most recent checkpoints to keep")
    save_checkpoints: bool = flag(True, "save checkpoints (--no-save_checkpoints for throughput benchmarks)")
    profile: bool = flag(False, "write a Chrome trace of a few steps to RUN_DIR/profile/")
    seed: int = flag(0, "seed for initialization, data order and stochastic rounding")

    # Steps and batch
    n_steps: int = flag(1000, "optimizer steps")
    batch_size: int = flag(32, "global batch size (samples per optimizer step over all ranks and micro-steps)")
    grad_accum: int = flag(1, "micro-steps per optimizer step")

    # Optimizer and schedule
    optim: str = flag("AdamW", "optimizer class: a torch.optim name or a qt.optim name (e.g. AdamW8bit)")
    optim_kwargs: dict = flag({}, "extra optimizer arguments as JSON, e.g. '{\"eps\": 1e-6}'")
    lr: float = flag(3e-4, "peak learning rate")
    weight_decay: float = flag(0.1, "decoupled weight decay (not applied to norms and biases)")
    betas: list[float] = flag([0.9, 0.95], "Adam betas (two numbers)")
    schedule: str = flag("cosine", "LR schedule after warmup: cosine decay, warmup-stable-decay, or constant",
                         ("cosine", "wsd", "constant"))
    warmup_steps: int = flag(100, "linear warmup steps")
    decay_fraction: float = flag(0.2, "wsd: fraction of the steps spent in the final linear decay")
    min_lr_ratio: float = flag(0.1, "final LR as a fraction of --lr (cosine and wsd)")
    clip_grad_norm: float = flag(1.0, "clip the global gradient norm to this (0: no clipping)")
    offload_optimizer: bool = flag(False, "keep FP32 master weights and the optimizer states on the CPU and step "
                                          "there (qt.optim.CPUOffloadOptimizer): the GPU holds only the weights "
                                          "and the gradients in flight")

    # Numerics and speed
    quantize: str = flag("none", "quantized-training recipe from qt.RECIPES; none = the BF16 baseline")
    quantize_kwargs: dict = flag({}, "recipe arguments as JSON, e.g. '{\"grad_weight\": false}'")
    quantize_lm_head: bool = flag(False, "also quantize the output layer")
    dtype: str = flag("auto", "weights: bf16, fp32, or fp32_master (fp32 weights, bf16 compute); "
                              "auto = bf16 on GPU, fp32 on CPU", ("auto", "bf16", "fp32", "fp32_master"))
    compile: bool = flag(False, "torch.compile each block")
    activation_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass")
    ddp: bool = flag(False, "under torchrun, replicate the model with DDP instead of sharding it with FSDP2")


# Settings that may differ when a run is resumed: they change neither the model nor the loss curve.
RESUMABLE_CHANGES = {"run_dir", "resume", "wandb", "project", "run_name", "log_interval", "eval_interval",
                     "ckpt_interval", "keep_checkpoints", "save_checkpoints", "profile"}
# The optimisation settings a user changes after a divergence: a resume may change them too (the loop notes it in
# the log); the continued loss curve then differs from the original run's, on purpose.
RETUNABLE_ON_RESUME = ("lr", "clip_grad_norm", "warmup_steps", "schedule", "decay_fraction", "min_lr_ratio")


def _converter(name: str, type_):
    """A function from a command-line string (or a YAML scalar) to the field's type."""
    if type_ is dict:
        def parse_json(text):
            if isinstance(text, dict):
                return text
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--{name} must be a JSON object, e.g. '{{\"eps\": 1e-6}}' ({e})") from None
            if not isinstance(value, dict):
                raise ConfigError(f"--{name} must be a JSON object, e.g. '{{\"eps\": 1e-6}}', not {text!r}")
            return value
        return parse_json
    if type_ is bool:
        def parse_bool(value):
            if isinstance(value, bool):
                return value
            raise ConfigError(f"{name} must be true or false, not {value!r}")
        return parse_bool

    def parse_scalar(value):
        try:
            return type_(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be {type_.__name__}, not {value!r}") from None
    return parse_scalar


def _field_types(cls) -> dict[str, tuple]:
    """name -> (base type, is a list) for every field; `X | None` counts as X."""
    types = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is list:
            types[name] = (args[0], True)
        else:
            types[name] = (args[0] if args else hint, False)
    return types


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    # Defaults are suppressed so that the parsed namespace holds only the flags given on the command line:
    # those override the YAML file and count as explicit settings when resuming.
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of flags (e.g. configs/runs/quickstart.yaml); "
                                         "command-line flags override it")
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        type_, is_list = types[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs = {"help": f"{f.metadata['help']} (default: {default})"}
        if type_ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _argparse_type(f.name, type_)
            kwargs["choices"] = f.metadata.get("choices")
            kwargs["nargs"] = "+" if is_list else None
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def _argparse_type(name, type_):
    convert = _converter(name, type_)

    def argparse_type(text):
        try:
            return convert(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    argparse_type.__name__ = type_.__name__
    return argparse_type


def load_yaml(path: str, cls) -> dict:
    """The flags in a YAML file, converted to the fields' types."""
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file (run configs are in configs/runs/)")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must be a mapping of flag names to values")
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {', '.join(unknown)}; valid keys are the "
                          f"flags of --help without the dashes")
    converted = {}
    for name, value in values.items():
        type_, is_list = types[name]
        convert = _converter(name, type_)
        if value is None:
            converted[name] = None
        elif is_list:
            if not isinstance(value, list):
                raise ConfigError(f"--config {path}: {name} must be a list, e.g. [0.9, 0.95]")
            converted[name] = [convert(v) for v in value]
        else:
            # PyYAML reads 3e-4 (no dot) as a string; the converter makes it a float.
            converted[name] = convert(value)
    return converted


def parse_config(cls, argv: list[str] | None, description: str):
    """(config, names of the settings given explicitly in the YAML file or on the command line)."""
    args = vars(build_parser(cls, description).parse_args(argv))
    config_file = args.pop("config", None)
    values = load_yaml(config_file, cls) if config_file else {}
    values.update(args)
    cfg = cls(**values)
    check_choices(cfg)
    return cfg, set(values)


def check_train_flags(cfg, world_size: int, positive: tuple[str, ...] = ()) -> None:
    """Refuse inconsistent common flags (and non-positive `positive` ones) before anything is loaded."""
    for name in ("n_steps", "batch_size", "grad_accum", "log_interval", *positive):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be at least 1")
    if cfg.batch_size % (cfg.grad_accum * world_size):
        per_step = cfg.grad_accum * world_size
        raise ConfigError(f"--batch_size {cfg.batch_size} must be divisible by --grad_accum {cfg.grad_accum} "
                          f"x {world_size} processes; e.g. --batch_size {-(-cfg.batch_size // per_step) * per_step}")
    if len(cfg.betas) != 2:
        raise ConfigError(f"--betas takes two numbers, e.g. --betas 0.9 0.95 (got {cfg.betas})")
    if cfg.offload_optimizer and world_size > 1:
        raise ConfigError("--offload_optimizer runs on one process: drop it under torchrun (FSDP2 shards the "
                          "optimizer states over the GPUs instead)")
    if cfg.offload_optimizer and cfg.quantize != "none":
        raise ConfigError(f"--offload_optimizer steps plain weights: use it with --quantize none, not {cfg.quantize}")


def check_choices(cfg) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"--{f.name} must be one of {', '.join(choices)}, not {getattr(cfg, f.name)!r}")


def merge_for_resume(cfg, explicit: set[str], saved: dict):
    """The saved run's config, with the explicitly given settings that may change on resume applied: those of
    RESUMABLE_CHANGES and RETUNABLE_ON_RESUME.

    Any other explicit setting that differs from the saved run is an error: the continued run would not
    be the run that was started.
    """
    current = dataclasses.asdict(cfg)
    may_change = RESUMABLE_CHANGES | set(RETUNABLE_ON_RESUME)
    changed = sorted(k for k in explicit - may_change if k in saved and current[k] != saved[k])
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume with a different config ({details}); a resume may change only "
                          f"{', '.join('--' + k for k in RETUNABLE_ON_RESUME)} and the logging and checkpoint "
                          f"flags: drop the others to continue the run, or start a new run with another --run_dir")
    merged = {k: v for k, v in saved.items() if k in current}
    merged.update({k: current[k] for k in explicit & may_change})
    return type(cfg)(**merged)


def save_config(cfg, path: Path) -> None:
    write_atomically(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a crash at any point leaves the old or the new file, on disk (fsynced)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make the creations, renames and deletions in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def one_line_errors(main):
    """Run an entry point; a TrainingError becomes a one-line message and exit status 2, not a traceback."""
    def wrapped(argv=None):
        try:
            return main(argv)
        except TrainingError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    return wrapped
