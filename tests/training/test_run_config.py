from pathlib import Path

from qt.training.checkpoint import resolve_run_config
from qt.training.config import ConfigError, TrainConfig, parse_config, save_config


def no_default_name(cfg):
    raise ConfigError("--model is required")


def test_resuming_from_the_run_dir_alone_takes_the_name_and_settings_from_the_saved_config(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(TrainConfig(run_dir=str(run_dir), run_name="saved-name", lr=0.01), run_dir / "config.yaml")
    cfg, explicit = parse_config(TrainConfig, ["--run_dir", str(run_dir), "--resume"], "test")
    resumed = resolve_run_config(cfg, explicit, no_default_name)
    assert (resumed.run_name, resumed.run_dir, resumed.lr, resumed.resume) == ("saved-name", str(run_dir), 0.01, True)


def test_a_new_run_is_named_and_placed_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, explicit = parse_config(TrainConfig, ["--resume"], "test")  # a first run may pass --resume
    cfg = resolve_run_config(cfg, explicit, lambda cfg: "model-none")
    assert (cfg.run_name, Path(cfg.run_dir)) == ("model-none", Path("runs") / "model-none")
