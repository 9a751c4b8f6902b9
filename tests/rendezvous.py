"""Where the 2-process gloo tests' processes meet: a file, not a TCP port. A port found free can be taken
by another socket (gloo's own connections included) before the store listens on it."""

from pathlib import Path


def rendezvous_file(folder) -> str:
    """An init_method URL for a fresh rendezvous file in `folder` (a new one per process group)."""
    path = Path(folder) / "rendezvous"
    path.unlink(missing_ok=True)
    return f"file://{path}"
