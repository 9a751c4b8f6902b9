"""Where the 2-process gloo tests' processes meet: a file, not a TCP port. A port found free can be taken
by another socket (gloo's own connections included) before the store listens on it."""

import os
from pathlib import Path

import torch.distributed as dist


def rendezvous_file(folder) -> str:
    """An init_method URL for a fresh rendezvous file in `folder` (a new one per process group)."""
    path = Path(folder) / "rendezvous"
    path.unlink(missing_ok=True)
    return f"file://{path}"


def end_worker() -> None:
    """Ends a spawned gloo worker that did its work: destroys its process group and skips the interpreter's
    teardown, in which a process that trained FSDP2 models on gloo now and then aborts ("terminate called
    without an active exception", no Python frame, after every check passed; ~1 run in 5 on a loaded machine)."""
    dist.destroy_process_group()
    os._exit(0)
