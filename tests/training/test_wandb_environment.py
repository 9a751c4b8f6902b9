"""wandb's environment variables win over the flags' values: WANDB_MODE=disabled turns wandb off."""

import pytest

from qt.training.config import TrainConfig
from qt.training.distributed import Dist
from qt.training.metrics import MetricsLogger

wandb = pytest.importorskip("wandb")


@pytest.fixture
def no_account(tmp_path, monkeypatch):
    """No wandb API key (--wandb auto would log offline) and no WANDB_ variable but those a test sets."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a wandb key
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def logger(run_dir) -> MetricsLogger:
    run_dir.mkdir()
    cfg = TrainConfig(run_dir=str(run_dir), run_name="run", wandb="auto", n_steps=1)
    return MetricsLogger(cfg, Dist(rank=0, world_size=1, device=__import__("torch").device("cpu")), start_step=0)


def test_wandb_mode_disabled_turns_wandb_off(no_account, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    metrics = logger(tmp_path / "run")
    metrics.close()
    assert metrics.wandb is None and not (tmp_path / "run" / "wandb").exists()


def test_wandb_project_name_and_dir_come_from_the_environment(no_account, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "project-from-env")
    monkeypatch.setenv("WANDB_NAME", "name-from-env")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    metrics = logger(tmp_path / "run")
    try:
        assert (metrics.wandb.project, metrics.wandb.name) == ("project-from-env", "name-from-env")
    finally:
        metrics.close()
    assert list((tmp_path / "elsewhere" / "wandb").glob("offline-run-*")) and not (tmp_path / "run" / "wandb").exists()
