"""Flags and YAML values that would train silently wrong are one-line errors; nothing is rounded or coerced."""

import re

import pytest

import llm_pretrain
from qt.training.config import ConfigError, TrainConfig, build_parser, check_train_flags, parse_config
from qt.training.optimizer import lr_at


def checked(argv, cls=TrainConfig):
    cfg, _ = parse_config(cls, argv, "test")
    check_train_flags(cfg, world_size=1)
    return cfg


@pytest.mark.parametrize("flags, message", [
    (["--clip_grad_norm", "-1"], "--clip_grad_norm must be at least 0 (0: no clipping), not -1.0"),
    (["--min_lr_ratio", "-1"], "--min_lr_ratio must be between 0 and 1"),
    (["--min_lr_ratio", "1.5"], "--min_lr_ratio must be between 0 and 1"),
    (["--weight_decay", "-50"], "--weight_decay must be at least 0, not -50.0"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1, not -1"),
    (["--lr", "1e39"], "--lr must be a positive number below 10, not 1e+39"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr=-3e-4"], "--lr must be a positive number"),
    (["--betas", "0.9", "1.5"], "--betas must be two numbers in [0, 1)"),
    (["--warmup_steps", "-5"], "--warmup_steps must be at least 0"),
    (["--decay_fraction", "2"], "--decay_fraction must be between 0 and 1"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be at least 1"),
    (["--ckpt_interval", "-1"], "--ckpt_interval must be at least 0"),
    (["--fsdp_prefetch", "-1"], "--fsdp_prefetch must be at least 0, not -1"),
    (["--fsdp_unit_blocks", "0"], "--fsdp_unit_blocks must be at least 1, not 0"),
    (["--gc_interval", "-1"], "--gc_interval must be at least 0, not -1"),
])
def test_out_of_range_flags_are_refused(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        checked(flags)


def test_out_of_range_flag_from_the_command_line_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        llm_pretrain.main(["--dataset_dir", "nowhere", "--clip_grad_norm", "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --clip_grad_norm must be at least 0 (0: no clipping), not -1.0"]


def test_fsdp_prefetch_is_a_whole_number_and_runs_on_one_process_where_it_does_nothing(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("fsdp_prefetch: 1.5\n")
    with pytest.raises(ConfigError, match=re.escape(f"--config {config}: fsdp_prefetch must be an integer, not 1.5")):
        checked(["--config", str(config)])
    with pytest.raises(SystemExit):
        checked(["--fsdp_prefetch", "two"])
    assert "argument --fsdp_prefetch: fsdp_prefetch must be an integer, not 'two'" in capsys.readouterr().err
    # A config written for several GPUs also runs (and resumes) on one, where nothing is all-gathered, and with DDP,
    # which replicates the weights (the default prefetches, so refusing it would refuse every --ddp run).
    assert checked(["--fsdp_prefetch", "3"]).fsdp_prefetch == 3
    assert checked(["--ddp"]).fsdp_prefetch is None  # the recipe's default


def test_integers_written_as_floats_are_read_exactly(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("n_tokens: 1e9\nbatch_size: 16.0\nrun_name: 2024\ninit_from: null\n")
    cfg, _ = parse_config(llm_pretrain.PretrainConfig, ["--config", str(config), "--seq_len", "1.28e2"], "test")
    assert (cfg.n_tokens, cfg.batch_size, cfg.seq_len, cfg.run_name, cfg.init_from) == (10**9, 16, 128, "2024", None)
    assert all(isinstance(v, int) for v in (cfg.n_tokens, cfg.batch_size, cfg.seq_len))


def test_a_warmup_longer_than_the_run_is_scaled_to_a_tenth_with_a_warning(capsys):
    cfg = checked(["--lr", "1.0", "--n_steps", "20", "--warmup_steps", "100", "--schedule", "constant"])
    assert "warning: --warmup_steps 100 >= --n_steps 20" in capsys.readouterr().err
    # Peak LR after 2 warmup steps, where 100 would have kept it at 20% at the end of the run.
    assert [lr_at(step, cfg) for step in (1, 2, 3, 20)] == [0.5, 1.0, 1.0, 1.0]
    cfg = checked(["--lr", "1.0", "--n_steps", "5", "--warmup_steps", "5", "--schedule", "constant"])
    assert lr_at(1, cfg) == 1.0 and "warming up for 0 steps" in capsys.readouterr().err  # a tenth of 5 steps
    cfg = checked(["--lr", "1.0", "--n_steps", "21", "--warmup_steps", "20"])
    assert lr_at(10, cfg) == 0.5 and "warning" not in capsys.readouterr().err  # shorter than the run: as given
    assert "warms up for a tenth" in " ".join(build_parser(TrainConfig, "test").format_help().split())


def test_n_tokens_sets_the_steps_before_the_warmup_is_compared(capsys):
    cfg = llm_pretrain.check_flags(llm_pretrain.PretrainConfig(dataset_dir="d", n_tokens=50 * 32 * 512), {"n_tokens"},
                                   world_size=1)
    assert cfg.n_steps == 50 and "--warmup_steps 100 >= --n_steps 50" in capsys.readouterr().err


@pytest.mark.parametrize("flags, quantized", [([], 2), (["--quantize_small_linears"], 14)])
def test_quantize_small_linears_quantizes_the_linears_the_recipe_would_leave(flags, quantized, monkeypatch, capsys):
    import qt
    from qt.training.models import quantize_model
    from tests.tiny_models import tiny_llama
    monkeypatch.setattr(qt.quantize, "SMALL_LINEAR_DEVICES", ("cpu",))  # the rule applies on GPUs
    monkeypatch.setitem(qt.SMALL_LINEAR_MIN_SHAPE, "int8_mixed_precision", qt.MinShape(128, 0))
    cfg = checked(["--quantize", "int8_mixed_precision", "--run_name", "run", *flags], llm_pretrain.PretrainConfig)
    model = tiny_llama()
    quantize_model(model, cfg, announce=True)
    assert sum(isinstance(m.weight, qt.QuantizedWeight) for m in model.modules() if hasattr(m, "weight")) == quantized
    out = capsys.readouterr().out
    assert out.startswith(f"run: int8_mixed_precision on {quantized} of 15 linears; left in high precision: ")
    assert ("too small for int8_mixed_precision: 12 x model.layers.*" in out) == (not flags)
    assert out.rstrip().endswith("(--quantize_small_linears quantizes them too)") == (not flags)
