"""Where metrics go: RUN_DIR/metrics.jsonl (always, one JSON object a line), wandb (when installed and
not disabled), and a progress bar (or, when stderr is not a terminal, one printed line per log)."""

from __future__ import annotations

import dataclasses
import json
import netrc
import os
import re
import sys
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from qt.training.config import ConfigError, is_baseline, write_atomically
from qt.training.distributed import Dist, resolve_dtypes
from qt.training.models import resolve_recipe

# Dense BF16 tensor-core peak FLOP/s, for MFU. The first name contained in the device name wins.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
                   "B200": 2250e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
                   "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


# wandb's environment variables for what qt passes to wandb.init: set, they win over the flags (wandb.init's
# arguments would otherwise override them). Those qt does not pass (WANDB_ENTITY, ...) apply as wandb reads them.
WANDB_ENVIRONMENT = {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "name": "WANDB_NAME", "dir": "WANDB_DIR",
                     "id": "WANDB_RUN_ID"}


def wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id, kept in RUN_DIR/wandb_run_id so that the same wandb run continues after --resume.
    What is read back must be an id written here: a planted file (or a link out of the run directory) must
    not become data sent to wandb."""
    id_file = run_dir / "wandb_run_id"
    if not id_file.exists() and not id_file.is_symlink():
        id_file.write_text(uuid.uuid4().hex[:8])
    text = id_file.read_text().strip() if id_file.resolve().is_relative_to(run_dir.resolve()) else None
    if text is None or not re.fullmatch(r"[0-9a-z]{1,64}", text):
        raise ConfigError(f"{id_file} is not a wandb run id written by this run; delete it to start a new wandb run")
    return text


def resolve_wandb_mode(mode: str) -> str | None:
    """The wandb mode to run in (WANDB_MODE where set, else --wandb), or None for no wandb. `auto` never
    fails: offline without an account, nothing without the package."""
    mode = os.environ.get(WANDB_ENVIRONMENT["mode"]) or mode
    if mode == "disabled":
        return None
    try:
        import wandb  # noqa: F401  (optional dependency)
    except ImportError:
        if mode == "auto":
            return None
        raise ConfigError(f"wandb mode {mode} (--wandb or WANDB_MODE) needs `pip install wandb` (or pass "
                          f"--wandb disabled)") from None
    if mode == "auto":
        return "online" if wandb_api_key_configured() else "offline"
    return mode


def recipe_label(quantize: str, dtype: str, device: torch.device) -> str:
    """What a run is called in tables, plots and wandb: its recipe, or for the baseline the dtype its
    matmuls ran in, bf16 or fp32 (--quantize none does not say which)."""
    if not is_baseline(quantize):
        return quantize
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[resolve_dtypes(dtype, device)[1]]


def wandb_config(cfg, device: torch.device) -> dict:
    """The run's flags, plus what the wandb UI compares runs by: `recipe` (recipe_label) and `recipe_options`
    (every option of the recipe, defaults included). A sweep's group and tags come from wandb's own
    WANDB_RUN_GROUP and WANDB_TAGS, which scripts/sweep_recipes.sh sets."""
    recipe = resolve_recipe(cfg)
    return {**dataclasses.asdict(cfg), "recipe": recipe_label(cfg.quantize, cfg.dtype, device),
            "recipe_options": dataclasses.asdict(recipe) if recipe else {}}


def _lines_and_records(path: Path) -> list[tuple[str, dict]]:
    """The lines of a metrics.jsonl that hold a record, with their records; a torn line is skipped."""
    pairs = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            pairs.append((line, record))
    return pairs


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, skipping a line torn by a crash or a full disk."""
    return [record for _, record in _lines_and_records(path)] if path.is_file() else []


class MetricsLogger:
    """Rank 0 logs; the other ranks' loggers do nothing."""

    def __init__(self, cfg, dist_info: Dist, start_step: int):
        self.enabled = dist_info.is_main
        if not self.enabled:
            return
        run_dir = Path(cfg.run_dir)
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.wandb = None
        mode = resolve_wandb_mode(cfg.wandb)
        if mode:
            import wandb
            settings = {"mode": mode, "project": cfg.project, "name": cfg.run_name, "dir": str(run_dir),
                        "id": wandb_run_id(run_dir)}
            # Passed explicitly: wandb reads its environment only the first time it is set up in a process.
            settings = {k: os.environ.get(WANDB_ENVIRONMENT[k]) or v for k, v in settings.items()}
            self.wandb = wandb.init(**settings, config=wandb_config(cfg, dist_info.device), resume="allow")
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(total=cfg.n_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not self.terminal)
        self.n_steps = cfg.n_steps

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint a run resumes from: that stretch is trained again. Also drops
        a line torn by a crash or a full disk. Atomic: a crash while rewriting leaves the old file."""
        if self.path.is_file():
            kept = [line for line, record in _lines_and_records(self.path) if record["step"] <= step]
            write_atomically(self.path, "".join(line + "\n" for line in kept))

    def step_done(self) -> None:
        if self.enabled:
            self.bar.update()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["step"])
        summary = {k: record[k] for k in ("loss", "val_loss", "val_acc") if k in record}
        for key, short in (("tokens_per_second", "tok/s"), ("images_per_second", "img/s")):
            if key in record:
                summary[short] = f"{record[key]:,.0f}"
        if self.terminal:
            self.bar.set_postfix({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in summary.items()})
        else:
            print(f"step {record['step']}/{self.n_steps} " + " ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()), flush=True)

    def message(self, text: str) -> None:
        if self.enabled and self.terminal:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        if self.wandb:
            self.wandb.finish()
