"""The run directory and its checkpoints.

    RUN_DIR/config.yaml                       the resolved config
    RUN_DIR/checkpoints/step_00000500/rank_0.pt ...   one file per rank
    RUN_DIR/checkpoints/latest                the name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp/` and renamed when every rank has finished, then `latest` is
replaced atomically: a crash or Ctrl-C while saving leaves the previous checkpoint as `latest`.

Loading never runs code from the run directory, whoever wrote into it: `latest` must hold a checkpoint name
(`step_` and 8 digits), every file read must lie inside RUN_DIR once symlinks are resolved, and files are read
with `torch.load(weights_only=True)`, which admits tensors, containers and the types of `_checkpoint_globals`.

Model and optimizer states go through `state_dict()` and `torch.save`, so quantized weights (tensor
subclasses) and FSDP2 shards (DTensors) are saved as they are. Under FSDP2 every rank saves its shards;
otherwise rank 0 saves the one replica. Every rank saves its RNG states: stochastic rounding draws from them.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from qt.training.config import ConfigError, TrainingError, merge_for_resume, write_atomically
from qt.training.distributed import Dist, barrier, unwrap

CHECKPOINT_NAME = re.compile(r"step_\d{8}")


class CheckpointError(TrainingError):
    """A checkpoint or run-directory file that cannot be used safely."""


def resolve_run_config(cfg, explicit: set[str]):
    """The config to run: `cfg`, or with --resume the saved run's config (see merge_for_resume).
    Refuses to start a new run over an existing one. Writes nothing: the loop saves config.yaml."""
    saved = Path(cfg.run_dir) / "config.yaml"
    if cfg.resume and saved.is_file():
        return merge_for_resume(cfg, explicit, yaml.safe_load(inside_run_dir(cfg.run_dir, saved).read_text()))
    if saved.is_file() and not cfg.resume:
        raise ConfigError(f"{cfg.run_dir} already holds a run; continue it with --resume or pick another --run_dir")
    return cfg


def inside_run_dir(run_dir, path: Path) -> Path:
    """`path` with symlinks resolved, if it lies inside `run_dir`: a run directory must not make us read elsewhere."""
    root, resolved = Path(run_dir).resolve(), path.resolve()
    if not resolved.is_relative_to(root):
        raise CheckpointError(f"refusing to read {path}: it leads outside the run directory {root} (to {resolved})")
    return resolved


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _qt_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        if sub.__module__.split(".")[0] == "qt":
            found.append(sub)
        found += _qt_subclasses(sub)
    return found


def _checkpoint_globals() -> list:
    """What a checkpoint holds besides what torch admits by itself (tensors, DTensor shards and their meshes and
    placements, containers, numbers, strings): the recipes' weight classes and their configs (qt's subclasses of
    QuantizedWeight and RecipeConfig, whatever the recipes are now), and the pieces of numpy's RNG state."""
    from qt.config import RecipeConfig
    from qt.subclass import QuantizedWeight

    numpy_keys = np.random.get_state()[1]
    return [*_qt_subclasses(QuantizedWeight), *_qt_subclasses(RecipeConfig),
            np.ndarray, np.dtype, type(numpy_keys.dtype), numpy_keys.__reduce__()[0]]


def load_file(path: Path, device) -> dict:
    """torch.load without running code: an object of any other type than `_checkpoint_globals`' is refused."""
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(f"refusing to load {path}: it holds {unsafe.group(1) if unsafe else 'a Python object'}, "
                              f"which a qt checkpoint never does (only tensors and qt's types); the file was "
                              f"written by something else") from None


class Checkpointer:
    def __init__(self, run_dir: Path, dist_info: Dist, *, sharded: bool, keep: int):
        self.root = Path(run_dir).resolve()
        self.dir = self.root / "checkpoints"
        self.dist, self.sharded, self.keep = dist_info, sharded, max(keep, 1)

    def _inside(self, path: Path) -> Path:
        return inside_run_dir(self.root, path)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names (None without `latest`); anything but a checkpoint name is refused."""
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        name = self._inside(pointer).read_text().strip()
        if not CHECKPOINT_NAME.fullmatch(name):
            raise CheckpointError(f"{pointer} must hold a checkpoint name like step_00000500, not {name[:80]!r}")
        return self.dir / name

    def save(self, step: int, model, optimizer, extra: dict) -> Path:
        """Save model, optimizer, RNG states and `extra` (loop and data position) as checkpoint `step`."""
        final, tmp = self.dir / f"step_{step:08d}", self.dir / f"step_{step:08d}.tmp"
        barrier()
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            tmp.mkdir(parents=True)
        barrier()
        state = {"step": step, "world_size": self.dist.world_size, "rng": rng_state(), "extra": extra}
        if self.sharded or self.dist.is_main:
            state["model"] = unwrap(model).state_dict()
            state["optimizer"] = optimizer.state_dict()
        torch.save(state, tmp / f"rank_{self.dist.rank}.pt")
        barrier()
        if self.dist.is_main:
            if final.exists():  # from a timeline abandoned by resuming an earlier checkpoint; not `latest`
                shutil.rmtree(final)
            tmp.rename(final)
            write_atomically(self.dir / "latest", final.name)
            self._prune(newest=final)
        barrier()
        return final

    def _prune(self, newest: Path) -> None:
        """Keep the `keep` newest checkpoints up to `newest`; later ones belong to an abandoned timeline."""
        complete = sorted(p for p in self.dir.glob("step_*") if p.suffix != ".tmp" and p.name <= newest.name)
        later = [p for p in self.dir.glob("step_*") if p.suffix != ".tmp" and p.name > newest.name]
        for path in complete[:-self.keep] + later + list(self.dir.glob("step_*.tmp")):
            shutil.rmtree(path)

    def load(self, model, optimizer) -> tuple[int, dict]:
        """Restore the latest checkpoint into model and optimizer and this rank's RNG; (step, extra)."""
        path = self.latest()
        state = load_file(self._inside(path / f"rank_{self.dist.rank}.pt"), self.dist.device)
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(f"{path} was written by {state['world_size']} processes; resume it with the same "
                              f"number (torchrun --nproc_per_node {state['world_size']})")
        replica = (state if self.sharded or self.dist.is_main
                   else load_file(self._inside(path / "rank_0.pt"), self.dist.device))
        unwrap(model).load_state_dict(replica["model"])
        optimizer.load_state_dict(replica["optimizer"])
        set_rng_state(state["rng"])
        return state["step"], state["extra"]
