import math

import pytest

from qt.training.config import ConfigError, TrainConfig, merge_for_resume, parse_config
from qt.training.optimizer import lr_at


def test_yaml_sets_flags_and_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 3e-4\nbetas: [0.8, 0.99]\ncompile: true\noptim_kwargs: {eps: 1.0e-6}\nn_steps: 50\n")
    cfg, explicit = parse_config(TrainConfig, ["--config", str(config), "--n_steps", "7"], "test")
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)  # PyYAML reads 3e-4 as a string
    assert cfg.betas == [0.8, 0.99] and cfg.compile is True and cfg.optim_kwargs == {"eps": 1e-6}
    assert cfg.n_steps == 7
    assert explicit == {"lr", "betas", "compile", "optim_kwargs", "n_steps"}


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 1\n", "unknown key"),
    ("lr: fast\n", "lr must be a finite number"),
    ("compile: maybe\n", "compile must be true or false"),
    ("schedule: linear\n", "--schedule must be one of"),
    ("- lr\n", "must be a mapping"),
    # Nothing is coerced: a list for a mapping, null for a value, a float or bool rounded into an int.
    ("optim_kwargs: [1, 2]\n", "--optim_kwargs must be a JSON object"),
    ("n_steps: null\n", "n_steps must have a value, not null"),
    ("n_steps: 20.9\n", "n_steps must be an integer, not 20.9"),
    ("n_steps: true\n", "n_steps must be an integer, not True"),
    ("batch_size: 8.9\n", "batch_size must be an integer, not 8.9"),
    ("lr: true\n", "lr must be a finite number, not True"),
    ("lr: .inf\n", "lr must be a finite number, not inf"),
    ("lr: [0.1]\n", "lr must be a finite number"),
    ("optim: [AdamW]\n", "optim must be a string"),
    ("betas: [0.9, yes]\n", "betas must be a finite number, not True"),
])
def test_bad_yaml_is_a_one_line_error(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, ["--config", str(config)], "test")


def test_bad_json_flag_exits_with_a_message(capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--optim_kwargs", "{eps: 1}"], "test")
    assert "must be a JSON object" in capsys.readouterr().err


def test_resume_keeps_saved_settings_and_refuses_changed_ones():
    saved = TrainConfig(run_dir="runs/a", lr=1e-3, n_steps=100).__dict__
    cfg, explicit = parse_config(TrainConfig, ["--run_dir", "runs/a", "--resume", "--log_interval", "5"], "test")
    merged = merge_for_resume(cfg, explicit, saved)
    assert (merged.lr, merged.n_steps, merged.log_interval, merged.resume) == (1e-3, 100, 5, True)
    cfg, explicit = parse_config(TrainConfig, ["--run_dir", "runs/a", "--resume", "--n_steps", "200"], "test")
    with pytest.raises(ConfigError, match="cannot resume with a different config .*n_steps.*may change only --lr, "
                                          "--clip_grad_norm, --warmup_steps, --schedule"):
        merge_for_resume(cfg, explicit, saved)


def test_resume_may_change_the_optimisation_settings_a_divergence_calls_for():
    saved = TrainConfig(run_dir="runs/a", lr=1e-3, n_steps=100).__dict__
    flags = ["--lr", "3e-4", "--clip_grad_norm", "0.5", "--warmup_steps", "300", "--schedule", "wsd",
             "--decay_fraction", "0.3", "--min_lr_ratio", "0.05"]
    cfg, explicit = parse_config(TrainConfig, ["--run_dir", "runs/a", "--resume", *flags], "test")
    merged = merge_for_resume(cfg, explicit, saved)
    assert (merged.lr, merged.clip_grad_norm, merged.warmup_steps, merged.schedule, merged.decay_fraction,
            merged.min_lr_ratio, merged.n_steps) == (3e-4, 0.5, 300, "wsd", 0.3, 0.05, 100)


def test_resume_may_change_how_the_same_steps_are_computed():
    saved = TrainConfig(run_dir="runs/a", n_steps=100).__dict__
    cfg, explicit = parse_config(TrainConfig, ["--run_dir", "runs/a", "--resume", "--grad_accum", "4",
                                               "--fsdp_prefetch", "1", "--no-fsdp_reshard_after_forward",
                                               "--gc_interval", "0"], "test")
    merged = merge_for_resume(cfg, explicit, saved)
    assert (merged.grad_accum, merged.fsdp_prefetch, merged.fsdp_reshard_after_forward, merged.gc_interval,
            merged.n_steps) == (4, 1, False, 0, 100)


def test_schedules():
    cosine = TrainConfig(lr=1.0, warmup_steps=10, n_steps=110, min_lr_ratio=0.1)
    assert lr_at(5, cosine) == 0.5 and lr_at(10, cosine) == 1.0
    assert math.isclose(lr_at(60, cosine), 0.55) and math.isclose(lr_at(110, cosine), 0.1)
    wsd = TrainConfig(lr=1.0, warmup_steps=10, n_steps=110, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(88, wsd) == 1.0 and math.isclose(lr_at(99, wsd), 0.5) and lr_at(110, wsd) == 0.0
    assert lr_at(100, TrainConfig(lr=1.0, warmup_steps=10, schedule="constant")) == 1.0


@pytest.mark.parametrize("flags, dtype", [
    (["--quantize", "fp32"], "fp32"), (["--quantize", "bf16"], "bf16"),
    (["--quantize", "bf16", "--dtype", "fp32_master"], "fp32_master"), (["--quantize", "none"], "auto")])
def test_the_baseline_goes_by_the_dtype_it_computes_in_and_none_stays_an_alias(flags, dtype):
    cfg, explicit = parse_config(TrainConfig, flags, "test")
    assert (cfg.quantize, cfg.dtype) == (flags[1], dtype)
    assert ("dtype" in explicit) == (dtype != "auto")  # resuming refuses a baseline of another dtype


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "fp32", "--dtype", "bf16"], "--quantize fp32 is the baseline computing in fp32, but --dtype bf16"),
    (["--quantize", "int3"], "unknown recipe 'int3'; choose bf16 or fp32 .* or one of: int8_weight_only"),
])
def test_a_baseline_name_that_contradicts_dtype_or_an_unknown_recipe_is_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, flags, "test")


def test_help_names_the_baseline_by_its_dtype(capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--help"], "test")
    assert "bf16 or fp32" in " ".join(capsys.readouterr().out.split())
