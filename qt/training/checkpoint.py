"""The run directory and its checkpoints.

    RUN_DIR/config.yaml                                the resolved config
    RUN_DIR/.lock                                      locked by the process training in RUN_DIR (names it)
    RUN_DIR/checkpoints/step_00000500/.metadata        model and optimizer states: a torch.distributed.checkpoint
    RUN_DIR/checkpoints/step_00000500/__R_0.distcp ... (DCP) checkpoint, the tensors each rank R held
    RUN_DIR/checkpoints/step_00000500/rank_R.pt ...    each rank's RNG states and the loop's position
    RUN_DIR/checkpoints/step_00000500/manifest.json    each file's size and SHA-256, the step, the run's config and
                                                       device type
    RUN_DIR/checkpoints/latest                         the name of the newest complete checkpoint

One process trains in a run directory at a time: rank 0 locks RUN_DIR/.lock (lockf) before writing anything,
and a second run on the directory stops with an error naming the first.

Saving survives a crash, kill -9 or full disk at any point: the files are written into `step_N.tmp/` and
fsynced with their manifest, the directory is renamed to `step_N/` when every rank has finished, then `latest`
is replaced atomically. Until then the previous checkpoint stays `latest`; a failed save removes its partial
files and says why in one line ("no space left on device"). With `asynchronous=True` (--async_checkpoint) a
save copies the states to CPU memory and returns; a background thread writes and publishes the checkpoint
(manifest, rename, `latest`, pruning) once every rank's write succeeded. One save is in flight at a time: the
next save, and the end of training (`wait`), wait for it and raise its failure.

Any number of processes resumes a checkpoint written by any number (with FSDP2 or without: one process, DDP).
Model and optimizer states go through `torch.distributed.checkpoint` (get_model_state_dict /
get_optimizer_state_dict), which stores every tensor as its global shape and the pieces each rank held, and
loads into whatever pieces the resuming ranks hold. Quantized weights (tensor subclasses) are stored as their
inner tensors (`_flatten_subclasses`: `layer.weight.__int_data`, `layer.weight.__scale`, ...), as DCP cannot
cut a subclass: an inner tensor with the weight's rows is sharded with those rows, as FSDP2 shards them (INT8
data and row-wise scales, master and latent weights); any other (a tensorwise scale) is stored whole, as the
same on every rank. qt.optim's states are plain tensors laid out by the parameter's rows (quantized states:
codes and block scales), so DCP reshards them as they are. An optimizer that steps its own copies of the
parameters (CPUOffloadOptimizer, which runs only on replicated models) is saved by rank 0 in rank_0.pt and
loaded by every rank. At the same number of processes a resume is bit-exact. Every rank restores the RNG
states it saved; on more processes than saved, the new ranks take rank 0's. Under FSDP2 each rank draws
(stochastic rounding, dropout) for its own rows, so on another number of processes the draws differ from the
uninterrupted run's: the run goes on from the same weights, optimizer states and data position (the data order
does not depend on the number of processes), with other random draws.

Checkpoints of earlier qt versions (`rank_R.pt` holding the model and optimizer states) still load, with the
number of processes that wrote them; their next save is in the reshardable layout.

Loading never runs code from the run directory, whoever wrote into it: `latest` must hold a checkpoint name
(`step_` and 8 digits), every file read must lie inside RUN_DIR once symlinks are resolved, `rank_R.pt` files
and DCP's tensors and other values are read with `torch.load(weights_only=True)`, which admits tensors,
containers and the types of `_checkpoint_globals`, and DCP's `.metadata` (a pickle) with an unpickler that
admits only DCP's metadata classes (`_METADATA_GLOBALS`). A checkpoint whose files do not match their manifest
(truncated, bit flips, missing, unreadable) is skipped with a one-line warning for the newest older one that is
intact; so is a missing `latest` (then the newest intact checkpoint is used). Pruning happens only after a
save, when `latest` names the checkpoint just written.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import pathlib
import pickle
import random
import re
import shutil
import socket
import sys
import threading
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from qt.training.config import (ConfigError, TrainingError, fsync_directory, merge_for_resume,
                                write_atomically)
from qt.training.distributed import Dist, barrier, unwrap

CHECKPOINT_NAME = re.compile(r"step_\d{8}")

# DCP says this on every save and load of one process without a process group, which is how qt runs on one GPU.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


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


def rng_state(device: torch.device) -> dict:
    """The generators a process draws from. On a GPU, that of its own GPU only: every process sees all of the
    machine's GPUs, and a run resumed where fewer are visible could not restore the others."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    cuda = state["cuda"]
    if cuda is None or device.type != "cuda":  # a GPU run resumed on CPU draws from its CPU generator only
        return
    if isinstance(cuda, (list, tuple)):  # checkpoints written before 2026-11-26 hold every visible GPU's state
        index = torch.cuda.current_device() if device.index is None else device.index
        cuda = cuda[index] if index < len(cuda) else cuda[0]
    torch.cuda.set_rng_state(cuda.cpu(), device)


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


def _refusal(path, error: pickle.UnpicklingError) -> CheckpointError:
    unsafe = re.search(r"GLOBAL (\S+)", str(error))
    return CheckpointError(f"refusing to load {path}: it holds {unsafe.group(1) if unsafe else 'a Python object'}, "
                           f"which a qt checkpoint never does (only tensors and qt's types); the file was written "
                           f"by something else")


def _load_weights_only(file, device=None):
    """torch.load admitting only tensors, containers and `_checkpoint_globals`' types."""
    with torch.serialization.safe_globals(_checkpoint_globals()):
        return torch.load(file, map_location=device, weights_only=True)


def load_file(path: Path, device) -> dict:
    """torch.load without running code: an object of any other type than `_checkpoint_globals`' is refused.
    A file torch cannot read at all (truncated, garbage) raises DamagedCheckpoint."""
    try:
        return _load_weights_only(path, device)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path.name} does not load: {' '.join(str(e).split())[:200]}") from None


# What DCP's `.metadata` pickle may name (what torch 2.11 to 2.14 write there): its metadata classes, the pieces
# of tensor properties (sizes, dtypes, layouts), and the checkpoint's path in StorageMeta.
_METADATA_GLOBALS = {(obj.__module__, obj.__name__): obj for obj in (
    dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata,
    dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties, dcp_metadata.StorageMeta,
    dcp_metadata.MetadataIndex, dcp_metadata._MEM_FORMAT_ENCODING, _StorageInfo, torch.Size,
    torch.serialization._get_layout, pathlib.PurePosixPath, pathlib.PosixPath)}
_METADATA_GLOBALS.update({("torch", str(dtype).removeprefix("torch.")): dtype
                          for dtype in vars(torch).values() if isinstance(dtype, torch.dtype)})


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not DCP metadata")
        return _METADATA_GLOBALS[module, name]


def read_dcp_metadata(path: Path) -> dcp_metadata.Metadata:
    """DCP's `.metadata` file, unpickled without running code: any global but `_METADATA_GLOBALS`' is refused
    (CheckpointError). A file that does not unpickle to DCP metadata raises DamagedCheckpoint."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise _refusal(path, e) from None
        raise DamagedCheckpoint(f"{path.name} does not load: {e}") from None
    except Exception as e:  # garbage unpickles into any error
        raise DamagedCheckpoint(f"{path.name} does not load: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict):
        raise DamagedCheckpoint(f"{path.name} is not DCP metadata")
    return metadata


class _VerifiedReader(FileSystemReader):
    """DCP's file reader, handed the metadata already read by `read_dcp_metadata` (DCP's own reads it with pickle)."""

    def __init__(self, path: Path, metadata: dcp_metadata.Metadata):
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        self.metadata.storage_meta = self.metadata.storage_meta or dcp_metadata.StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class _WeightsOnlyLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's planner, but values other than tensors (optimizer hyperparameters) are read with weights_only
    (DCP's own torch.loads them with weights_only=False)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], _load_weights_only(value))


def _row_sharded_like(inner: torch.Tensor, weight: DTensor, key: str):
    """An inner tensor of the local shard of `weight`, as a DTensor: sharded with the weight's rows if it has
    them (INT8 data, row-wise scales, master weights), else as it is, whole (a tensorwise scale, the same on
    every rank)."""
    local = weight.to_local()
    if inner.dim() == 0 or inner.shape[0] != local.shape[0]:
        return inner
    if not all(p == Shard(0) or isinstance(p, Replicate) for p in weight.placements):
        raise CheckpointError(f"cannot checkpoint {key}: it is sharded as {weight.placements}, and qt checkpoints "
                              f"store quantized weights sharded along their rows (FSDP2's Shard(0)) or replicated")
    shape = (weight.shape[0], *inner.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(inner, weight.device_mesh, weight.placements, run_check=False, shape=shape,
                              stride=stride)


def _flatten_subclasses(state: dict) -> dict:
    """The model's state with each tensor subclass (a quantized weight) replaced by its inner tensors
    (`__tensor_flatten__`) under KEY.__NAME, as plain tensors or DTensors. They share storage with the
    weight: DCP loads into them in place."""
    flat = {}
    for key, value in state.items():
        local = value.to_local() if isinstance(value, DTensor) else value
        if not (isinstance(local, torch.Tensor) and is_traceable_wrapper_subclass(local)):
            flat[key] = value
            continue
        for name in local.__tensor_flatten__()[0]:
            inner = getattr(local, name)
            flat[f"{key}.__{name}"] = _row_sharded_like(inner, value, key) if isinstance(value, DTensor) else inner
    return flat


def _copied_to_cpu(value):
    """A copy of a (nested) state in CPU memory, DTensors staying DTensors, for a write in the background."""
    if isinstance(value, dict):
        return {k: _copied_to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied_to_cpu(v) for v in value]
    if isinstance(value, DTensor):
        return DTensor.from_local(value.to_local().detach().to("cpu", copy=True), value.device_mesh,
                                  value.placements, run_check=False, shape=value.shape, stride=value.stride())
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


def _steps_model_parameters(model, optimizer) -> bool:
    """Whether `optimizer` steps the model's own parameters (DCP then keys its states by parameter name), rather
    than copies of its own (CPUOffloadOptimizer's CPU masters)."""
    parameters = {id(p) for p in model.parameters()}
    return all(id(p) in parameters for group in optimizer.param_groups for p in group["params"])


def _dcp_files_of(rank: int, names, world_size: int) -> list[str]:
    """Which of a DCP checkpoint's files `rank` hashes: those it wrote (FileSystemWriter names them
    __RANK_N.distcp), still in its page cache; rank 0 the others (.metadata)."""
    def writer(name):
        match = re.match(r"__(\d+)_", name)
        return int(match.group(1)) if match and int(match.group(1)) < world_size else 0
    return [name for name in names if writer(name) == rank]


def _first_failure(error: CheckpointException) -> BaseException:
    """What went wrong on the ranks of a failed DCP save or load: the first OSError (a full disk), else the first."""
    failures = [exc for exc, _ in error.failures.values()]
    return next((f for f in failures if isinstance(f, OSError)), failures[0])


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


def _file_entry(path: Path) -> dict:
    """The size and SHA-256 of `path`, as its manifest entry."""
    with open(path, "rb") as f:
        return {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _verify(path: Path, expected: dict | None) -> None:
    if expected is None:
        raise DamagedCheckpoint(f"{path.name} is not in the manifest")
    try:
        found = _file_entry(path)
    except OSError as e:
        raise DamagedCheckpoint(f"{path.name}: {e.strerror}") from None
    if found["size"] != expected["size"]:
        raise DamagedCheckpoint(f"{path.name} has {found['size']} bytes, not {expected['size']}")
    if found["sha256"] != expected["sha256"]:
        raise DamagedCheckpoint(f"{path.name} does not match its SHA-256")


def _describe(error: Exception) -> str:
    if isinstance(error, OSError):
        if error.errno == errno.ENOSPC:
            return "no space left on device"
        return f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def warn(dist_info: Dist | None, text: str) -> None:
    if dist_info is None or dist_info.is_main:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def _gather(value, group=None) -> list:
    """`value` of every rank, in rank order."""
    if not torch_dist.is_initialized():
        return [value]
    values = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(values, value, group=group)
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
    world_size: int  # the number of processes that wrote it


class _Read(NamedTuple):
    """What a rank reads of a checkpoint before restoring it."""
    manifest: dict | None  # None for a checkpoint written before checkpoints had one
    rank_files: dict[str, dict]  # name -> content
    own: str  # the rank file whose RNG states this rank restores
    metadata: dcp_metadata.Metadata | None  # DCP's; None for the per-process files of earlier versions


def _in_background(work) -> Future:
    """Run work() in a thread of its own; its result, or exception, in the future returned."""
    future = Future()

    def run():
        try:
            future.set_result(work())
        except BaseException as e:  # noqa: B036 -- handed to whoever waits for the future
            future.set_exception(e)
    threading.Thread(target=run, name="qt-checkpoint-writer").start()
    return future


class Checkpointer:
    def __init__(self, run_dir, dist_info: Dist | None, *, sharded: bool, keep: int, asynchronous: bool = False):
        """`sharded`: the model is sharded (FSDP2), not replicated; only checkpoints of earlier qt versions
        need it. `asynchronous`: saves write in the background (see the module's docstring)."""
        self.root = Path(run_dir).resolve()
        self.dir = self.root / "checkpoints"
        self.dist, self.sharded, self.keep = dist_info, sharded, max(keep, 1)
        self.last_good: Path | None = None  # the checkpoint this run loaded or saved last
        self.asynchronous = asynchronous
        # The background writer's collectives get a group of their own: training goes on on the default one.
        self.group = torch_dist.new_group(backend="gloo") if asynchronous and torch_dist.is_initialized() else None
        self.in_flight: Future | None = None

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
        if not (isinstance(manifest, dict) and {"files", "world_size"} <= manifest.keys()
                and all(Path(name).name == name for name in manifest["files"])):
            raise DamagedCheckpoint("manifest.json is unreadable")
        return manifest

    def save(self, step: int, model, optimizer, extra: dict, config: dict | None = None) -> Path:
        """Save model, optimizer, RNG states and `extra` (loop and data position) as checkpoint `step`, with
        `config` (the run's settings) in its manifest. If any rank fails to write (a full disk, say), every rank
        raises CheckpointError and the previous checkpoint stays `latest`: here, or with `asynchronous` at the
        next save or `wait`, which first wait for the save in flight."""
        self.wait()
        states = {"model": _flatten_subclasses(get_model_state_dict(model))}
        rank_state = {"step": step, "world_size": self.dist.world_size, "extra": extra}
        if _steps_model_parameters(model, optimizer):
            states["optimizer"] = get_optimizer_state_dict(model, optimizer)
        elif self.dist.is_main:
            rank_state["optimizer"] = optimizer.state_dict()
        # after get_optimizer_state_dict, which may step (lr 0) to create states
        rank_state["rng"] = rng_state(self.dist.device)
        if not self.asynchronous:
            return self._write(step, states, rank_state, config)
        states, rank_state = _copied_to_cpu(states), _copied_to_cpu(rank_state)  # before training goes on
        self.in_flight = _in_background(lambda: self._write(step, states, rank_state, config))
        return self.dir / f"step_{step:08d}"

    def wait(self, *, quietly: bool = False) -> None:
        """Until the save in flight (if any) is written and published. Its failure raises CheckpointError, or
        with `quietly` (the run is stopping for another reason) is a warning."""
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is None:
            return
        try:
            in_flight.result()
        except CheckpointError as e:
            if not quietly:
                raise
            warn(self.dist, str(e))

    def _write(self, step: int, states: dict, rank_state: dict, config: dict | None) -> Path:
        final, tmp = self.dir / f"step_{step:08d}", self.dir / f"step_{step:08d}.tmp"
        failure = None
        if self.dist.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
                tmp.mkdir(parents=True)
            except OSError as e:
                failure = _describe(e)
        failure = _gather(failure, self.group)[0]  # every rank writes, or none
        entries = {}
        if failure is None:
            try:
                entries = self._write_files(tmp, states, rank_state)
            except Exception as e:
                failure = _describe(e)
        outcomes = _gather((entries, failure), self.group)
        failure = next((f for _, f in outcomes if f), None)
        if failure is None and self.dist.is_main:
            try:
                self._publish(tmp, final, {"step": step, "world_size": self.dist.world_size, "config": config,
                                           "device": self.dist.device.type,
                                           "files": {n: e for entries, _ in outcomes for n, e in entries.items()}})
            except OSError as e:
                failure = _describe(e)
        failure = next((f for f in _gather(failure, self.group) if f), None)
        if failure:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = self.last_good.name if self.last_good else "none yet"
            raise CheckpointError(f"could not save checkpoint {final.name} in {self.dir}: {failure}; the previous "
                                  f"checkpoint ({kept}) is kept")
        self.last_good = final
        return final

    def _write_files(self, tmp: Path, states: dict, rank_state: dict) -> dict[str, dict]:
        """This rank's part of the checkpoint in `tmp`: its DCP pieces and its rank file, on disk (fsynced);
        the size and SHA-256 of each file it wrote."""
        try:
            dcp.save(states, storage_writer=FileSystemWriter(tmp), process_group=self.group,
                     no_dist=not torch_dist.is_initialized())
        except CheckpointException as e:  # every rank gets the failure of any
            raise _first_failure(e) from None
        # The folder, not the returned metadata: torch 2.11 returns it without storage_data on ranks other than 0.
        # dcp.save ends with a collective after rank 0 wrote .metadata, so every file is there.
        names = {path.name for path in tmp.iterdir() if path.suffix == ".distcp"} | {".metadata"}
        entries = {name: _file_entry(tmp / name)
                   for name in _dcp_files_of(self.dist.rank, sorted(names), self.dist.world_size)}
        rank_file = f"rank_{self.dist.rank}.pt"
        entries[rank_file] = _save_file(tmp / rank_file, rank_state)
        return entries

    def _publish(self, tmp: Path, final: Path, manifest: dict) -> None:
        """Rank 0, once every rank's files are on disk: the manifest, the rename, `latest`, then pruning."""
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
        """Restore the newest intact checkpoint (see `candidates`) into model and optimizer (None: the model
        only) and this rank's RNG; None when the run has no checkpoint. Every damaged checkpoint skipped is a
        one-line warning; if none is intact, or a file holds anything but what qt saves, CheckpointError."""
        latest, candidates, pointer = self.latest(), self.candidates(), self.dir / "latest"
        if latest is None and candidates:
            warn(self.dist, f"{pointer} is missing or unreadable; resuming from the newest intact checkpoint")
        elif latest is not None and latest not in candidates[:1]:
            warn(self.dist, f"{pointer} names {latest.name}, which does not exist; trying older checkpoints")
        damaged = []
        for path in candidates:
            read, problem, refusal = None, None, None
            try:
                read = self._read(path)
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
                return self._restore(path, read, model, optimizer)
            warn(self.dist, f"checkpoint {path.name} is damaged ({problem}); trying an older one")
            damaged.append(f"{path.name}: {problem}")
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self.dir} ({'; '.join(damaged)}); move them away to "
                                  f"start the run over")
        return None

    def _read(self, path: Path) -> _Read:
        """What this rank needs of checkpoint `path` before restoring it, verified against its manifest."""
        manifest = self.manifest(path)
        if manifest is not None and ".metadata" in manifest["files"]:
            return self._read_dcp(path, manifest)
        if manifest is None and os.path.lexists(path / ".metadata"):
            raise DamagedCheckpoint("manifest.json is missing")
        return self._read_per_process(path, manifest)

    def _read_file(self, path: Path, manifest: dict | None, name: str) -> dict:
        file = self._inside(path / name)
        if manifest is not None:
            _verify(file, manifest["files"].get(name))
        return load_file(file, self.dist.device)

    def _read_dcp(self, path: Path, manifest: dict) -> _Read:
        """This rank's share of the DCP files verified (each file by one rank), DCP's metadata, its rank file (rank
        0's for a rank the saving run did not have) and rank 0's."""
        files = sorted(manifest["files"])
        for name in files[self.dist.rank::self.dist.world_size]:
            _verify(self._inside(path / name), manifest["files"][name])
        own = f"rank_{self.dist.rank if self.dist.rank < manifest['world_size'] else 0}.pt"
        rank_files = {name: self._read_file(path, manifest, name) for name in {own, "rank_0.pt"}}
        _verify(self._inside(path / ".metadata"), manifest["files"][".metadata"])
        metadata = read_dcp_metadata(path / ".metadata")
        for info in metadata.storage_data.values():
            if not (isinstance(info, _StorageInfo) and info.relative_path in manifest["files"]):
                raise CheckpointError(f"refusing to load {path}: its .metadata names "
                                      f"{getattr(info, 'relative_path', info)!r}, which is not one of its files")
        return _Read(manifest, rank_files, own, metadata)

    def _read_per_process(self, path: Path, manifest: dict | None) -> _Read:
        """A checkpoint of earlier qt versions: this rank's file, and rank 0's (which holds the model and optimizer
        of a replicated model)."""
        if manifest is None:
            warn(self.dist, f"checkpoint {path.name} has no manifest (written by an older qt): loading it unverified")
        else:
            self._check_world_size(path, manifest["world_size"])
        own = f"rank_{self.dist.rank}.pt"
        return _Read(manifest, {name: self._read_file(path, manifest, name) for name in {own, "rank_0.pt"}}, own, None)

    def _check_world_size(self, path: Path, saved: int) -> None:
        if saved != self.dist.world_size:
            raise ConfigError(f"{path} was written by {saved} processes in the per-process layout of earlier qt "
                              f"versions, which loads only on as many: resume it with torchrun --nproc_per_node "
                              f"{saved} (its next checkpoint can then be resumed on any number)")

    def _restore(self, path: Path, read: _Read, model, optimizer) -> Restored:
        own = read.rank_files[read.own]
        if read.metadata is None:
            self._check_world_size(path, own["world_size"])
            replica = own if self.sharded else read.rank_files["rank_0.pt"]
            unwrap(model).load_state_dict(replica["model"])
            if optimizer is not None:
                optimizer.load_state_dict(replica["optimizer"])
        else:
            self._restore_dcp(path, read.metadata, read.rank_files["rank_0.pt"], model, optimizer,
                              saved_on=read.manifest.get("device"))
        set_rng_state(own["rng"], self.dist.device)
        self.last_good = path
        return Restored(own["step"], own["extra"], path, read.manifest and read.manifest.get("config"),
                        own["world_size"])

    def _restore_dcp(self, path: Path, metadata, rank_0: dict, model, optimizer, saved_on: str | None) -> None:
        """DCP loads into the tensors of the model's own state dict (and of its optimizer's, created by a step
        at lr 0 if it has none yet), whatever pieces this rank holds of them. `saved_on`: the device type of
        the run that saved it (None before manifests named it)."""
        states = {"model": _flatten_subclasses(get_model_state_dict(model))}
        by_name = optimizer is not None and _steps_model_parameters(model, optimizer)
        if by_name:
            states["optimizer"] = get_optimizer_state_dict(model, optimizer)
            saved = {name: {k: v for k, v in param_state.items() if f"optimizer.state.{name}.{k}" in
                            metadata.state_dict_metadata} for name, param_state in states["optimizer"]["state"].items()}
            # A parameter that had no state when saved (no gradient yet) gets none.
            states["optimizer"]["state"] = {name: param_state for name, param_state in saved.items() if param_state}
        try:
            dcp.load(states, storage_reader=_VerifiedReader(path, metadata), planner=_WeightsOnlyLoadPlanner(),
                     no_dist=not torch_dist.is_initialized())
        except CheckpointException as e:
            failure = _first_failure(e)
            if isinstance(failure, pickle.UnpicklingError):
                raise _refusal(path, failure) from None
            here, problem = self.dist.device.type, _describe(failure).rstrip(".")
            hint = (f"; it was saved on {saved_on} and this run is on {here}, where quantize_ may leave other linears "
                    f"in high precision (its small-layer rule applies on GPUs only): resume it on {saved_on}"
                    if saved_on not in (None, here) else "")
            raise CheckpointError(f"cannot load {path} into this model: {problem}{hint}") from None
        if by_name:  # not strict: a parameter may have no state
            set_optimizer_state_dict(model, optimizer, states["optimizer"], options=StateDictOptions(strict=False))
        elif optimizer is not None:
            optimizer.load_state_dict(rank_0["optimizer"])
