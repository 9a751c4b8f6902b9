"""The run directory and its checkpoints.

    RUN_DIR/config.yaml                                the resolved config
    RUN_DIR/.lock                                      locked by the process training in RUN_DIR (names it)
    RUN_DIR/checkpoints/step_00000500/rank_0.pt ...    one file per rank
    RUN_DIR/checkpoints/step_00000500/manifest.json    each file's size and SHA-256, the step, the run's config
    RUN_DIR/checkpoints/latest                         the name of the newest complete checkpoint

One process trains in a run directory at a time: rank 0 locks RUN_DIR/.lock (lockf) before writing anything,
and a second run on the directory stops with an error naming the first.

Saving survives a crash, kill -9 or full disk at any point: the files are written into `step_N.tmp/` and
fsynced with their manifest, the directory is renamed to `step_N/` when every rank has finished, then `latest`
is replaced atomically. Until then the previous checkpoint stays `latest`; a failed save removes its partial
files and says why in one line ("no space left on device").

Loading never runs code from the run directory, whoever wrote into it: `latest` must hold a checkpoint name
(`step_` and 8 digits), every file read must lie inside RUN_DIR once symlinks are resolved, and files are read
with `torch.load(weights_only=True)`, which admits tensors, containers and the types of `_checkpoint_globals`.
A checkpoint whose files do not match their manifest (truncated, bit flips, missing, unreadable) is skipped with
a one-line warning for the newest older one that is intact; so is a missing `latest` (then the newest intact
checkpoint is used). Pruning happens only after a save, when `latest` names the checkpoint just written.

Model and optimizer states go through `state_dict()` and `torch.save`, so quantized weights (tensor
subclasses) and FSDP2 shards (DTensors) are saved as they are. Under FSDP2 every rank saves its shards;
otherwise rank 0 saves the one replica. Every rank saves its RNG states: stochastic rounding draws from them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import yaml

from qt.training.config import (ConfigError, TrainingError, fsync_directory, merge_for_resume,
                                write_atomically)
from qt.training.distributed import Dist, barrier, unwrap

CHECKPOINT_NAME = re.compile(r"step_\d{8}")


class CheckpointError(TrainingError):
    """A checkpoint or run-directory file that cannot be used safely, or a save that failed."""


class DamagedCheckpoint(Exception):
    """A checkpoint whose files do not match its manifest or cannot be read: an older one may be intact."""


def place_run(cfg, default_name):
    """--run_name defaults to default_name(cfg) and --run_dir to runs/RUN_NAME. With --run_dir given the
    name is left for resolve_run_config to derive from the saved config, so `--run_dir R --resume` needs no
    other flag. Called before anything is checked: every process must agree on the run directory first."""
    if cfg.run_dir is None:
        cfg.run_name = cfg.run_name or default_name(cfg)
        cfg.run_dir = str(Path("runs") / cfg.run_name)
    return cfg


def resolve_run_config(cfg, explicit: set[str], default_name):
    """The config to run: `cfg`, or with --resume the run's own config (see merge_for_resume), which the
    checkpoint it resumes from carries (config.yaml for checkpoints written before they did); placed (see
    place_run) and named: --run_name defaults to default_name of the config to run. Refuses to start a new
    run over an existing one. Writes nothing: the loop saves config.yaml."""
    cfg = place_run(cfg, default_name)
    if not cfg.resume:
        refuse_existing_run(cfg.run_dir)
    elif (saved := saved_config(cfg.run_dir)) is not None:
        cfg = merge_for_resume(cfg, explicit, saved)
    cfg.run_name = cfg.run_name or default_name(cfg)
    # Every process has read the run directory before rank 0 writes to it (config.yaml, the lock): a rank
    # that looked later would take the new run for an existing one.
    barrier()
    return cfg


def refuse_existing_run(run_dir) -> None:
    if (Path(run_dir) / "config.yaml").is_file() or Checkpointer(run_dir, None, sharded=False, keep=1).complete():
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume or pick another --run_dir")


def saved_config(run_dir) -> dict | None:
    """The config of the newest checkpoint whose manifest carries one, else config.yaml's; None for a new run."""
    checkpointer = Checkpointer(run_dir, None, sharded=False, keep=1)
    for path in checkpointer.candidates():
        try:
            manifest = checkpointer.manifest(path)
        except DamagedCheckpoint:
            continue
        if manifest and manifest.get("config"):
            return manifest["config"]
    config_file = Path(run_dir) / "config.yaml"
    if config_file.is_file():
        return yaml.safe_load(inside_run_dir(run_dir, config_file).read_text())
    return None


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
    """torch.load without running code: an object of any other type than `_checkpoint_globals`' is refused.
    A file torch cannot read at all (truncated, garbage) raises DamagedCheckpoint."""
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(f"refusing to load {path}: it holds {unsafe.group(1) if unsafe else 'a Python object'}, "
                              f"which a qt checkpoint never does (only tensors and qt's types); the file was "
                              f"written by something else") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path.name} does not load: {' '.join(str(e).split())[:200]}") from None


class _HashingWriter:
    """A file object for torch.save that hashes and counts the bytes on their way to the file. torch reports
    a failed write as a RuntimeError of its own; the OSError behind it is kept in `error`."""

    def __init__(self, file):
        self.file, self.sha256, self.size, self.error = file, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha256.update(data)
        self.size += written
        return written

    def flush(self) -> None:
        self.file.flush()


def _save_file(path: Path, state: dict) -> dict:
    """torch.save `state` to `path`, on disk when this returns (fsynced); its size and SHA-256."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error:
                raise writer.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return {"size": writer.size, "sha256": writer.sha256.hexdigest()}


def _verify(path: Path, expected: dict | None) -> None:
    if expected is None:
        raise DamagedCheckpoint(f"{path.name} is not in the manifest")
    try:
        size = path.stat().st_size
        if size != expected["size"]:
            raise DamagedCheckpoint(f"{path.name} has {size} bytes, not {expected['size']}")
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise DamagedCheckpoint(f"{path.name}: {e.strerror}") from None
    if digest != expected["sha256"]:
        raise DamagedCheckpoint(f"{path.name} does not match its SHA-256")


def _describe(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "no space left on device"
    return f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")


def warn(dist_info: Dist | None, text: str) -> None:
    if dist_info is None or dist_info.is_main:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def _gather(value) -> list:
    """`value` of every rank, in rank order."""
    if not torch_dist.is_initialized():
        return [value]
    values = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(values, value)
    return values


class RunDirLock:
    """Held (by rank 0) while a run trains in RUN_DIR: an exclusive lock on RUN_DIR/.lock, which names the
    holder. The kernel releases it when the process ends, however it ends."""

    def __init__(self, run_dir, dist_info: Dist):
        self.path, self.dist, self.fd = Path(run_dir) / ".lock", dist_info, None

    def __enter__(self) -> RunDirLock:
        error = None
        if self.dist.is_main:
            try:
                self._acquire()
            except CheckpointError as e:
                error = str(e)
        errors = [e for e in _gather(error) if e]
        if errors:
            self.__exit__()
            raise CheckpointError(errors[0])
        return self

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot lock {self.path}: {e.strerror}") from None
        try:
            # A POSIX record lock, not flock: processes forked while training (DataLoader workers) would share an
            # flock with the file descriptor they inherit and hold it after the run released it.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise CheckpointError(f"cannot lock {self.path}: {e.strerror}") from None
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that has not named itself yet"
            os.close(fd)
            raise CheckpointError(f"{self.path.parent} is in use by another run ({holder}); wait for it to end or "
                                  f"stop it, or pick another --run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd

    def __exit__(self, *exc_info) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class Restored:
    step: int
    extra: dict
    path: Path
    config: dict | None  # the config the checkpoint was trained with (None if written before checkpoints carried it)


class Checkpointer:
    def __init__(self, run_dir, dist_info: Dist | None, *, sharded: bool, keep: int):
        self.root = Path(run_dir).resolve()
        self.dir = self.root / "checkpoints"
        self.dist, self.sharded, self.keep = dist_info, sharded, max(keep, 1)
        self.last_good: Path | None = None  # the checkpoint this run loaded or saved last

    def _inside(self, path: Path) -> Path:
        return inside_run_dir(self.root, path)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; None when `latest` is missing or unreadable. Anything but a
        checkpoint name in it is refused."""
        pointer = self.dir / "latest"
        if not os.path.lexists(pointer):
            return None
        try:
            name = self._inside(pointer).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not CHECKPOINT_NAME.fullmatch(name):
            raise CheckpointError(f"{pointer} must hold a checkpoint name like step_00000500, not {name[:80]!r}; "
                                  f"delete it to resume from the newest intact checkpoint")
        return self.dir / name

    def complete(self) -> list[Path]:
        """The checkpoints whose saving finished (renamed from step_N.tmp), oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir())

    def candidates(self) -> list[Path]:
        """What --resume tries, in order: `latest` and the older complete checkpoints, newest first (every
        complete checkpoint without a readable `latest`)."""
        latest = self.latest()
        return [p for p in reversed(self.complete()) if latest is None or p.name <= latest.name]

    def manifest(self, path: Path) -> dict | None:
        """The manifest of checkpoint `path`; None for a checkpoint written before checkpoints had one."""
        file = path / "manifest.json"
        if not os.path.lexists(file):
            return None
        try:
            manifest = json.loads(self._inside(file).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            manifest = None
        if not (isinstance(manifest, dict) and {"files", "world_size"} <= manifest.keys()):
            raise DamagedCheckpoint("manifest.json is unreadable")
        return manifest

    def save(self, step: int, model, optimizer, extra: dict, config: dict | None = None) -> Path:
        """Save model, optimizer, RNG states and `extra` (loop and data position) as checkpoint `step`, with
        `config` (the run's settings) in its manifest. If any rank fails to write (a full disk, say), every rank
        raises CheckpointError and the previous checkpoint stays `latest`."""
        final, tmp = self.dir / f"step_{step:08d}", self.dir / f"step_{step:08d}.tmp"
        name = f"rank_{self.dist.rank}.pt"
        state = {"step": step, "world_size": self.dist.world_size, "rng": rng_state(), "extra": extra}
        if self.sharded or self.dist.is_main:
            state["model"] = unwrap(model).state_dict()
            state["optimizer"] = optimizer.state_dict()
        barrier()
        failure = None
        if self.dist.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
                tmp.mkdir(parents=True)
            except OSError as e:
                failure = _describe(e)
        barrier()
        entry = None
        if failure is None:
            try:
                entry = _save_file(tmp / name, state)
            except OSError as e:
                failure = _describe(e)
        outcomes = _gather((name, entry, failure))
        failure = next((f for _, _, f in outcomes if f), None)
        if failure is None and self.dist.is_main:
            try:
                self._publish(tmp, final, {"step": step, "world_size": self.dist.world_size,
                                           "files": {n: e for n, e, _ in outcomes}, "config": config})
            except OSError as e:
                failure = _describe(e)
        failure = next((f for f in _gather(failure) if f), None)
        if failure:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = self.last_good.name if self.last_good else "none yet"
            raise CheckpointError(f"could not save checkpoint {final.name} in {self.dir}: {failure}; the previous "
                                  f"checkpoint ({kept}) is kept")
        self.last_good = final
        return final

    def _publish(self, tmp: Path, final: Path, manifest: dict) -> None:
        """Rank 0, once every rank's file is on disk: the manifest, the rename, `latest`, then pruning."""
        write_atomically(tmp / "manifest.json", json.dumps(manifest, indent=1))  # fsyncs tmp/ and its entries
        if final.exists():  # from a timeline abandoned by resuming an earlier checkpoint; not `latest`
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_directory(self.dir)
        write_atomically(self.dir / "latest", final.name)
        self._prune(newest=final)

    def _prune(self, newest: Path) -> None:
        """Keep the `keep` newest checkpoints up to `newest` (now `latest`); later ones belong to an abandoned
        timeline (a resume from an earlier checkpoint) or were found damaged."""
        complete = self.complete()
        older = [p for p in complete if p.name <= newest.name]
        later = [p for p in complete if p.name > newest.name]
        for path in older[:-self.keep] + later + list(self.dir.glob("step_*.tmp")):
            shutil.rmtree(path, ignore_errors=True)

    def load(self, model, optimizer) -> Restored | None:
        """Restore the newest intact checkpoint (see `candidates`) into model and optimizer and this rank's RNG;
        None when the run has no checkpoint. Every damaged checkpoint skipped is a one-line warning; if none is
        intact, or a file holds anything but what qt saves, CheckpointError."""
        latest, candidates, pointer = self.latest(), self.candidates(), self.dir / "latest"
        if latest is None and candidates:
            warn(self.dist, f"{pointer} is missing or unreadable; resuming from the newest intact checkpoint")
        elif latest is not None and latest not in candidates[:1]:
            warn(self.dist, f"{pointer} names {latest.name}, which does not exist; trying older checkpoints")
        damaged = []
        for path in candidates:
            states, manifest, problem, refusal = None, None, None, None
            try:
                manifest = self.manifest(path)
                states = self._read(path, manifest)
            except DamagedCheckpoint as e:
                problem = str(e)
            except CheckpointError as e:
                refusal = str(e)
            outcomes = _gather((problem, refusal))  # every rank must take the same checkpoint
            refusal = next((r for _, r in outcomes if r), None)
            if refusal:
                raise CheckpointError(refusal)
            problem = next((p for p, _ in outcomes if p), None)
            if problem is None:
                return self._restore(path, states, manifest, model, optimizer)
            warn(self.dist, f"checkpoint {path.name} is damaged ({problem}); trying an older one")
            damaged.append(f"{path.name}: {problem}")
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self.dir} ({'; '.join(damaged)}); move them away to "
                                  f"start the run over")
        return None

    def _read(self, path: Path, manifest: dict | None) -> dict[str, dict]:
        """This rank's files of checkpoint `path` (its own, and rank 0's replica without sharding), verified
        against the manifest and loaded."""
        if manifest is None:
            warn(self.dist, f"checkpoint {path.name} has no manifest (written by an older qt): loading it unverified")
        else:
            self._check_world_size(path, manifest["world_size"])
        names = {f"rank_{self.dist.rank}.pt"} | (set() if self.sharded else {"rank_0.pt"})
        states = {}
        for name in sorted(names):
            file = self._inside(path / name)
            if manifest is not None:
                _verify(file, manifest["files"].get(name))
            states[name] = load_file(file, self.dist.device)
        return states

    def _check_world_size(self, path: Path, saved: int) -> None:
        if saved != self.dist.world_size:
            raise ConfigError(f"{path} was written by {saved} processes; resume it with the same number "
                              f"(torchrun --nproc_per_node {saved})")

    def _restore(self, path: Path, states: dict, manifest: dict | None, model, optimizer) -> Restored:
        own = states[f"rank_{self.dist.rank}.pt"]
        self._check_world_size(path, own["world_size"])
        replica = own if self.sharded else states["rank_0.pt"]
        unwrap(model).load_state_dict(replica["model"])
        optimizer.load_state_dict(replica["optimizer"])
        set_rng_state(own["rng"])
        self.last_good = path
        return Restored(own["step"], own["extra"], path, manifest and manifest.get("config"))
