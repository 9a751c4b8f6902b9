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


def test_a_run_saved_before_the_small_linear_rule_resumes_quantizing_every_linear(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(TrainConfig(run_dir=str(run_dir), run_name="old", quantize="int8_mixed_precision"), run_dir / "config.yaml")
    saved = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text("".join(line + "\n" for line in saved.splitlines()
                                                 if not line.startswith("quantize_small_linears:")))
    cfg, explicit = parse_config(TrainConfig, ["--run_dir", str(run_dir), "--resume"], "test")
    assert resolve_run_config(cfg, explicit, no_default_name).quantize_small_linears is True
    save_config(TrainConfig(run_dir=str(run_dir), run_name="new", quantize="int8_mixed_precision"), run_dir / "config.yaml")
    assert resolve_run_config(cfg, explicit, no_default_name).quantize_small_linears is False
