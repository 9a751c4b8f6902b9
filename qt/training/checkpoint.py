"""The run directory and its checkpoints.

    RUN_DIR/config.yaml                       the resolved config
    RUN_DIR/checkpoints/step_00000500/rank_0.pt ...   one file per rank
    RUN_DIR/checkpoints/latest                the name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp/` and renamed when every rank has finished, then `latest` is
replaced atomically: a crash or Ctrl-C while saving leaves the previous checkpoint as `latest`.

Model and optimizer states go through `state_dict()` and `torch.save`, so quantized weights (tensor
subclasses) and FSDP2 shards (DTensors) are saved as they are. Under FSDP2 every rank saves its shards;
otherwise rank 0 saves the one replica. Every rank saves its RNG states: stochastic rounding draws from them.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from qt.training.config import ConfigError, merge_for_resume, write_atomically
from qt.training.distributed import Dist, barrier, unwrap


def place_run(cfg, default_name):
    """--run_name defaults to default_name(cfg) and --run_dir to runs/RUN_NAME. With --run_dir given the
    name is left for resolve_run_config to derive from the saved config, so `--run_dir R --resume` needs no
    other flag. Called before anything is checked: every process must agree on the run directory first."""
    if cfg.run_dir is None:
        cfg.run_name = cfg.run_name or default_name(cfg)
        cfg.run_dir = str(Path("runs") / cfg.run_name)
    return cfg


def resolve_run_config(cfg, explicit: set[str], default_name):
    """The config to run: `cfg`, or with --resume the saved run's config (see merge_for_resume), placed
    (see place_run) and named: --run_name defaults to default_name of the config to run.
    Refuses to start a new run over an existing one. Writes nothing: the loop saves config.yaml."""
    cfg = place_run(cfg, default_name)
    saved = Path(cfg.run_dir) / "config.yaml"
    if saved.is_file() and not cfg.resume:
        raise ConfigError(f"{cfg.run_dir} already holds a run; continue it with --resume or pick another --run_dir")
    if saved.is_file():
        cfg = merge_for_resume(cfg, explicit, yaml.safe_load(saved.read_text()))
    cfg.run_name = cfg.run_name or default_name(cfg)
    return cfg


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class Checkpointer:
    def __init__(self, run_dir: Path, dist_info: Dist, *, sharded: bool, keep: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.dist, self.sharded, self.keep = dist_info, sharded, max(keep, 1)

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        return self.dir / pointer.read_text().strip() if pointer.is_file() else None

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
        state = torch.load(path / f"rank_{self.dist.rank}.pt", map_location=self.dist.device, weights_only=False)
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(f"{path} was written by {state['world_size']} processes; resume it with the same "
                              f"number (torchrun --nproc_per_node {state['world_size']})")
        replica = state if self.sharded or self.dist.is_main else torch.load(path / "rank_0.pt", map_location=self.dist.device,
                                                         weights_only=False)
        unwrap(model).load_state_dict(replica["model"])
        optimizer.load_state_dict(replica["optimizer"])
        set_rng_state(state["rng"])
        return state["step"], state["extra"]
