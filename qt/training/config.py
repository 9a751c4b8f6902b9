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
import math
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
                               "the flags it may change: the logging and checkpoint ones, --grad_accum, "
                               "--fsdp_prefetch, --gc_interval, and (e.g. after a divergence) --lr, --clip_grad_norm, "
                               "--warmup_steps, --schedule, --decay_fraction, --min_lr_ratio")
    wandb: str = flag("auto", "wandb mode; auto = online if an API key is configured, else offline",
                      ("auto", "online", "offline", "disabled"))
    project: str = flag("qt", "wandb project")
    log_interval: int = flag(10, "steps between metrics.jsonl lines")
    eval_interval: int = flag(100, "steps between validation losses (0: only at the end)")
    ckpt_interval: int = flag(500, "steps between checkpoints (0: only at the end and on Ctrl-C/SIGTERM)")
    keep_checkpoints: int = flag(1, "how many most recent checkpoints to keep")
    save_checkpoints: bool = flag(True, "save checkpoints (--no-save_checkpoints for throughput benchmarks)")
    async_checkpoint: bool = flag(False, "write checkpoints in the background: a save copies the states to CPU memory "
                                         "and training goes on while they are written")
    profile: bool = flag(False, "write a Chrome trace of a few steps to RUN_DIR/profile/")
    sync_debug: bool = flag(False, "on a GPU, warn (with where) at each host-device synchronization inside a step "
                                   "that logs nothing, from step 3 (steps 1-2 compile)")
    gc_interval: int = flag(50, "steps between Python garbage collections (of the young generations) while "
                                "training, with automatic collection off; 0 = Python's automatic collection. "
                                "Under torchrun a collection that comes at different times on different ranks "
                                "holds every rank up at the next collective")
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
    warmup_steps: int = flag(100, "linear warmup steps; a run of at most this many --n_steps warms up for a "
                                  "tenth of its steps instead (with a warning)")
    decay_fraction: float = flag(0.2, "wsd: fraction of the steps spent in the final linear decay")
    min_lr_ratio: float = flag(0.1, "final LR as a fraction of --lr (cosine and wsd)")
    clip_grad_norm: float = flag(1.0, "clip the global gradient norm to this (0: no clipping)")
    offload_optimizer: bool = flag(False, "keep FP32 master weights and the optimizer states on the CPU and step "
                                          "there (qt.optim.CPUOffloadOptimizer): the GPU holds only the weights "
                                          "and the gradients in flight")

    # Numerics and speed
    quantize: str = flag("none", "quantized-training recipe from qt.RECIPES, or the baseline without one, named "
                                 "by the dtype it computes in: bf16 or fp32 (sets --dtype); none = the baseline "
                                 "in --dtype's compute dtype")
    quantize_kwargs: dict = flag({}, "recipe arguments as JSON, e.g. '{\"grad_weight\": false}'")
    quantize_lm_head: bool = flag(False, "also quantize the output layer")
    quantize_small_linears: bool = flag(False, "also quantize the linears too small for the recipe to be faster "
                                               "than the baseline on a GPU (qt.SMALL_LINEAR_MIN_SHAPE), which "
                                               "otherwise stay in the compute dtype")
    dtype: str = flag("auto", "weights: bf16, fp32, or fp32_master (fp32 weights, bf16 compute); "
                              "auto = bf16 on GPU, fp32 on CPU", ("auto", "bf16", "fp32", "fp32_master"))
    compile: bool = flag(False, "torch.compile each block")
    activation_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass")
    ddp: bool = flag(False, "under torchrun, replicate the model with DDP instead of sharding it with FSDP2")
    fsdp_prefetch: int | None = flag(None, "under torchrun with FSDP2, how many units (--fsdp_unit_blocks) ahead to "
                                           "all-gather explicitly: each unit starts the all-gathers of the next N in "
                                           "the forward and of the previous N in the backward (more memory: up to "
                                           "N + 1 units' gathered weights); 0 = FSDP2's implicit prefetching; "
                                           "default 2. No effect on one process or with --ddp")
    fsdp_unit_blocks: int = flag(2, "under torchrun with FSDP2, how many consecutive blocks share one FSDP2 unit "
                                    "(one all-gather and one reduce-scatter for all of them): fewer units spend "
                                    "less host time in FSDP2's hooks, for more memory (a unit's gathered weights). "
                                    "--fsdp_prefetch then counts units. Default 2: on 4 GPUs it took "
                                    "fp8_mixed_precision from 84.0%% to 89.9%% scaling efficiency, BF16 from 90.4%% "
                                    "to 90.8%% (docs/scaling.md). No effect on one process or with --ddp")
    fsdp_reshard_after_forward: bool = flag(True, "under torchrun with FSDP2, free each block's gathered weights "
                                                  "after its forward and all-gather them again for its backward; "
                                                  "--no-fsdp_reshard_after_forward keeps them from the forward to "
                                                  "the backward: a third less all-gather traffic for every block's "
                                                  "gathered weights held through the step. No effect on one "
                                                  "process or with --ddp")


# --quantize names of the unquantized baseline -> the --dtype values that compute in that dtype (the first is
# the one the name sets). `none` is the baseline in whatever --dtype computes in.
BASELINES = {"bf16": ("bf16", "fp32_master"), "fp32": ("fp32",)}


def is_baseline(quantize: str) -> bool:
    return quantize == "none" or quantize in BASELINES


# Settings that may differ when a run is resumed: they change neither the model nor the loss curve (grad_accum
# splits the same global batch into other micro-steps, e.g. to continue on fewer GPUs; fsdp_prefetch,
# fsdp_reshard_after_forward and fsdp_unit_blocks only move, skip or merge all-gathers; gc_interval only moves
# Python's garbage collections).
RESUMABLE_CHANGES = {"run_dir", "resume", "wandb", "project", "run_name", "log_interval", "eval_interval",
                     "ckpt_interval", "keep_checkpoints", "save_checkpoints", "async_checkpoint", "profile",
                     "sync_debug", "gc_interval", "grad_accum", "fsdp_prefetch", "fsdp_reshard_after_forward",
                     "fsdp_unit_blocks"}
# What a run saved before a setting existed did, where that is not the setting's default.
SETTINGS_BEFORE_THEY_EXISTED = {"quantize_small_linears": True}
# The optimisation settings a user changes after a divergence: a resume may change them too (the loop notes it in
# the log); the continued loss curve then differs from the original run's, on purpose.
RETUNABLE_ON_RESUME = ("lr", "clip_grad_norm", "warmup_steps", "schedule", "decay_fraction", "min_lr_ratio")


def _converter(name: str, type_):
    """A function from a command-line string (or a YAML value) to the field's type. Nothing is rounded or
    coerced silently: 20.9 or true for an int, true for a float, a list for a string are errors."""
    if type_ is dict:
        def parse_json(value):
            if isinstance(value, dict):
                return value
            try:
                parsed = json.loads(value) if isinstance(value, str) else value
            except json.JSONDecodeError as e:
                raise ConfigError(f"--{name} must be a JSON object, e.g. '{{\"eps\": 1e-6}}' ({e})") from None
            if not isinstance(parsed, dict):
                raise ConfigError(f"--{name} must be a JSON object, e.g. '{{\"eps\": 1e-6}}', not {value!r}")
            return parsed
        return parse_json
    if type_ is bool:
        def parse_bool(value):
            if isinstance(value, bool):
                return value
            raise ConfigError(f"{name} must be true or false, not {value!r}")
        return parse_bool

    def parse_scalar(value):
        parsed = _parse_scalar(value, type_)
        if parsed is None:
            raise ConfigError(f"{name} must be {_TYPE_NAMES.get(type_, type_.__name__)}, not {value!r}")
        return parsed
    return parse_scalar


_TYPE_NAMES = {int: "an integer", float: "a finite number", str: "a string"}


def _parse_scalar(value, type_):
    """`value` as an int, float or str, or None if it is not one exactly. Integers may be written as
    floats (1e9, 20.0) but not rounded (20.9); floats must be finite; booleans are neither."""
    if isinstance(value, (bool, list, dict)):
        return None
    if type_ is str:
        return str(value)
    if type_ is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass  # perhaps written as a float: 1e9
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    if type_ is float:
        return number
    return int(number) if type_ is int and number.is_integer() else None


def _field_types(cls) -> dict[str, tuple]:
    """name -> (base type, is a list, may be None) for every field; `X | None` counts as X."""
    types = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        if typing.get_origin(hint) is list:
            types[name] = (args[0], True, optional)
        else:
            types[name] = (args[0] if args else hint, False, optional)
    return types


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    # Defaults are suppressed so that the parsed namespace holds only the flags given on the command line:
    # those override the YAML file and count as explicit settings when resuming.
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of flags (e.g. configs/runs/quickstart.yaml); "
                                         "command-line flags override it")
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        type_, is_list, _ = types[f.name]
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
        try:
            converted[name] = _yaml_value(name, value, *types[name])
        except ConfigError as e:
            raise ConfigError(f"--config {path}: {e}") from None
    return converted


def _yaml_value(name: str, value, type_, is_list: bool, optional: bool):
    if value is None:
        if not optional:
            raise ConfigError(f"{name} must have a value, not null; remove the line to use the default")
        return None
    convert = _converter(name, type_)
    if is_list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, e.g. [0.9, 0.95]")
        return [convert(v) for v in value]
    # PyYAML reads 3e-4 (no dot) as a string; the converter makes it a float.
    return convert(value)


def parse_config(cls, argv: list[str] | None, description: str):
    """(config, names of the settings given explicitly in the YAML file or on the command line)."""
    args = vars(build_parser(cls, description).parse_args(argv))
    config_file = args.pop("config", None)
    values = load_yaml(config_file, cls) if config_file else {}
    values.update(args)
    cfg = cls(**values)
    check_choices(cfg)
    explicit = set(values)
    settle_baseline(cfg, explicit)
    return cfg, explicit


def settle_baseline(cfg, explicit: set[str]) -> None:
    """--quantize bf16 / fp32 is the baseline computing in that dtype: it sets --dtype to match (an explicit
    setting, so resuming checks it). Any other name must be a recipe."""
    name = cfg.quantize
    if name in BASELINES:
        dtypes = BASELINES[name]
        if cfg.dtype == "auto":
            cfg.dtype = dtypes[0]
            explicit.add("dtype")
        elif cfg.dtype not in dtypes:
            raise ConfigError(f"--quantize {name} is the baseline computing in {name}, but --dtype {cfg.dtype} "
                              f"does not; drop --dtype or pass --dtype {dtypes[0]}")
    elif name != "none":
        import qt
        if name not in qt.RECIPES:
            raise ConfigError(f"--quantize: unknown recipe {name!r}; choose {' or '.join(BASELINES)} (the baseline "
                              f"without quantization, in that dtype; none: in --dtype's) or one of: "
                              f"{', '.join(qt.RECIPES)}")


# The largest --lr accepted: above it no optimizer we know of trains; a typo (3e4 for 3e-4) is likelier.
MAX_LR = 10.0


def check_train_flags(cfg, world_size: int, positive: tuple[str, ...] = ()) -> None:
    """Refuse inconsistent or out-of-range common flags (and non-positive `positive` ones) before anything
    is loaded: a negative clipping norm, decay or LR would train silently wrong."""
    for name in ("n_steps", "batch_size", "grad_accum", "log_interval", "keep_checkpoints", "fsdp_unit_blocks",
                 *positive):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, not {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_interval", "ckpt_interval", "weight_decay", "fsdp_prefetch", "gc_interval"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ConfigError(f"--{name} must be at least 0, not {getattr(cfg, name)}")
    ranges = {"lr": (0 < cfg.lr < MAX_LR, f"a positive number below {MAX_LR:g}"),
              "clip_grad_norm": (cfg.clip_grad_norm >= 0, "at least 0 (0: no clipping)"),
              "min_lr_ratio": (0 <= cfg.min_lr_ratio <= 1, "between 0 and 1 (a fraction of --lr)"),
              "decay_fraction": (0 <= cfg.decay_fraction <= 1, "between 0 and 1"),
              "seed": (0 <= cfg.seed < 2**32, "between 0 and 2**32 - 1"),
              "betas": (all(0 <= b < 1 for b in cfg.betas), "two numbers in [0, 1), e.g. --betas 0.9 0.95")}
    for name, (ok, what) in ranges.items():
        if not ok:
            raise ConfigError(f"--{name} must be {what}, not {getattr(cfg, name)}")
    if cfg.batch_size % (cfg.grad_accum * world_size):
        per_step = cfg.grad_accum * world_size
        raise ConfigError(f"--batch_size {cfg.batch_size} must be divisible by --grad_accum {cfg.grad_accum} "
                          f"x {world_size} processes; e.g. --batch_size {-(-cfg.batch_size // per_step) * per_step}")
    if len(cfg.betas) != 2:
        raise ConfigError(f"--betas takes two numbers, e.g. --betas 0.9 0.95 (got {cfg.betas})")
    if cfg.offload_optimizer and world_size > 1:
        raise ConfigError("--offload_optimizer runs on one process: drop it under torchrun (FSDP2 shards the "
                          "optimizer states over the GPUs instead)")
    if cfg.offload_optimizer and not is_baseline(cfg.quantize):
        raise ConfigError(f"--offload_optimizer steps plain weights: use it with --quantize none (or bf16 / fp32), "
                          f"not {cfg.quantize}")
    if cfg.warmup_steps != effective_warmup_steps(cfg) and os.environ.get("RANK", "0") == "0":
        print(f"warning: --warmup_steps {cfg.warmup_steps} >= --n_steps {cfg.n_steps} would never reach the peak "
              f"LR; warming up for {effective_warmup_steps(cfg)} steps (a tenth of the run) instead", file=sys.stderr)


def effective_warmup_steps(cfg) -> int:
    """--warmup_steps, or for a run too short to finish it (--n_steps at most the warmup: a short test run
    with the default warmup) a tenth of the run, so the run does reach its peak LR."""
    return cfg.warmup_steps if cfg.warmup_steps < cfg.n_steps else cfg.n_steps // 10


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
                          f"{', '.join('--' + k for k in RETUNABLE_ON_RESUME)}, the logging and checkpoint flags, "
                          f"--grad_accum, --fsdp_prefetch and --gc_interval: drop the others to continue the run, or start a new run with another --run_dir")
    merged = {k: v for k, v in {**SETTINGS_BEFORE_THEY_EXISTED, **saved}.items() if k in current}
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
