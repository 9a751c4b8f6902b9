import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import llm_pretrain
import qt
from conftest import REPO, pretrain_args, quantized_weights_saved, read_metrics, without_timings
from qt.training.checkpoint import Checkpointer
from qt.training.config import ConfigError, check_train_flags
from qt.training.data import TokenShards, unigram_entropy

N_STEPS = 100  # the tiny model needs ~100 steps to get clearly below the unigram entropy


@pytest.fixture(scope="module")
def base_run(dataset_dir, tmp_path_factory):
    """100 steps with checkpoints at 25, 50, 75, 100 (all kept) and a profile."""
    run_dir = tmp_path_factory.mktemp("runs") / "base"
    llm_pretrain.main(pretrain_args(dataset_dir, run_dir, "--n_steps", str(N_STEPS), "--ckpt_interval", "25",
                                    "--keep_checkpoints", "4", "--profile"))
    return run_dir


def test_loss_falls_below_unigram_entropy_and_the_run_dir_holds_everything(base_run, dataset_dir):
    metrics = read_metrics(base_run)
    assert [m["step"] for m in metrics] == list(range(1, N_STEPS + 1))
    for key in ("tokens_seen", "loss", "lr", "grad_norm", "tokens_per_second", "mfu", "max_memory_allocated_gb",
                "host_wait_ms"):
        assert key in metrics[-1]
    assert 0 <= metrics[-1]["host_wait_ms"] < 1e3  # a CPU "device" runs each op as the host calls it
    assert metrics[-1]["tokens_seen"] == N_STEPS * 16 * 64
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.7  # from ~ln(512) = 6.2
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    # Below the loss of knowing only token frequencies: the model uses context.
    # (measured: 4.66 against 5.28; the margin leaves room for other versions of the stdlib corpus)
    assert len(val_losses) == 5 and val_losses[-1] < unigram_entropy(TokenShards(dataset_dir, "train")) - 0.2
    assert "lr: 0.003" in (base_run / "config.yaml").read_text()
    assert sorted(p.name for p in (base_run / "checkpoints").iterdir()) == [
        "latest", "step_00000025", "step_00000050", "step_00000075", "step_00000100"]
    assert (base_run / "profile" / "trace_rank0.json").stat().st_size > 0
    top_ops = (base_run / "profile" / "top_ops_rank0.txt").read_text()
    assert "Self CPU" in top_ops and "aten::" in top_ops


def test_resume_continues_the_loss_curve_bit_exactly(base_run, dataset_dir, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(base_run, resumed)
    (resumed / "checkpoints" / "latest").write_text("step_00000025")
    llm_pretrain.main(["--run_dir", str(resumed), "--resume"])
    assert without_timings(read_metrics(resumed)) == without_timings(read_metrics(base_run))
    finished = read_metrics(resumed)
    llm_pretrain.main(["--run_dir", str(resumed), "--resume"])  # a finished run: nothing left to do
    assert read_metrics(resumed) == finished


def test_grad_accum_and_activation_checkpointing_do_not_change_the_losses(base_run, dataset_dir, tmp_path):
    run_dir = tmp_path / "accum"
    # 6 steps: a run of at most --warmup_steps (5) steps would warm up for a tenth of its steps: other LRs.
    llm_pretrain.main(pretrain_args(dataset_dir, run_dir, "--n_steps", "6", "--grad_accum", "4",
                                    "--activation_checkpointing"))
    # Only the summation order differs: 4 micro-batches of 4 see the same windows as one batch of 16.
    base = read_metrics(base_run)[:5]
    for x, y in zip(read_metrics(run_dir), base):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_sigterm_saves_a_checkpoint_and_exits_75(dataset_dir, tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "llm_pretrain.py", *pretrain_args(dataset_dir, run_dir, "--n_steps",
                             "100000", "--ckpt_interval", "0")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output  # EX_TEMPFAIL: stopped, not finished (0) nor refused (2)
    last_step = read_metrics(run_dir)[-1]["step"]
    assert f"stopped at step {last_step}" in output
    assert Checkpointer(run_dir, None, sharded=False, keep=1).latest().name == f"step_{last_step:08d}"


def test_compiled_run_matches_eager(base_run, dataset_dir, tmp_path):
    run_dir = tmp_path / "compiled"
    llm_pretrain.main(pretrain_args(dataset_dir, run_dir, "--n_steps", "6", "--compile"))  # 6: see above
    for x, y in zip(read_metrics(run_dir), read_metrics(base_run)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


@pytest.fixture
def small_vocab_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    path = tmp_path / "small_vocab_model"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=100)).save_pretrained(path)
    return path


def bad_input_cases(dataset_dir, base_run, small_vocab_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    half = tmp_path / "half"
    shutil.copytree(dataset_dir, half)
    (half / "metadata.json").write_text((half / "metadata.json").read_text().replace('"complete": true',
                                                                                     '"complete": false'))
    run = tmp_path / "run"
    pretrained = pretrain_args(dataset_dir, run, "--init_from", str(small_vocab_model))
    model_flag = pretrained.index("--model")
    del pretrained[model_flag:model_flag + 2]
    return {
        "missing dataset": (pretrain_args(tmp_path / "nope", run), "does not exist"),
        "empty dataset": (pretrain_args(empty, run), "has no metadata.json"),
        "half-tokenized dataset": (pretrain_args(half, run), "did not finish"),
        "token ids beyond the vocab": (pretrained, "beyond the model's vocabulary of 100"),
        "seq_len beyond the shards": (pretrain_args(dataset_dir, run, "--seq_len", "10000000"),
                                      "lower --seq_len"),
        "batch not divisible": (pretrain_args(dataset_dir, run, "--batch_size", "6", "--grad_accum", "4"),
                                "must be divisible by --grad_accum 4"),
        "kwargs without a recipe": (pretrain_args(dataset_dir, run, "--quantize_kwargs", '{"x": 1}'),
                                    "needs a recipe"),
        "unknown recipe": (pretrain_args(dataset_dir, run, "--quantize", "int3"), "unknown recipe 'int3'"),
        "unknown recipe option": (pretrain_args(dataset_dir, run, "--quantize", "int8_mixed_precision",
                                                "--quantize_kwargs", '{"nope": 1}'), "has no option 'nope'"),
        "quantized head tied to the embedding": (pretrain_args(dataset_dir, run, "--quantize", "int8_weight_only",
                                                               "--quantize_lm_head"), "ties its LM head"),
        "bad optimizer kwarg": (pretrain_args(dataset_dir, run, "--optim_kwargs", '{"nope": 1}'), "nope"),
        "unknown optimizer": (pretrain_args(dataset_dir, run, "--optim", "Adamm"), "neither a torch.optim"),
        "unknown model": (pretrain_args(dataset_dir, run, "--model", "gpt5"), "neither a config"),
        "steps and tokens": (pretrain_args(dataset_dir, run, "--n_steps", "5", "--n_tokens", "100"), "not both"),
        "resume with another config": (["--run_dir", str(base_run), "--resume", "--seed", "5"],
                                       "cannot resume with a different config (seed: 0 -> 5)"),
        "existing run without resume": (pretrain_args(dataset_dir, base_run), "already holds a run"),
        "CPU offload of quantized weights": (pretrain_args(dataset_dir, run, "--offload_optimizer", "--quantize",
                                                           "int8_weight_only"), "use it with --quantize none"),
    }


CASES = ["missing dataset", "empty dataset", "half-tokenized dataset", "token ids beyond the vocab",
         "seq_len beyond the shards", "batch not divisible", "kwargs without a recipe", "unknown recipe",
         "unknown recipe option", "quantized head tied to the embedding", "bad optimizer kwarg",
         "unknown optimizer", "unknown model", "steps and tokens", "resume with another config",
         "existing run without resume", "CPU offload of quantized weights"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_before_training_with_one_line(case, dataset_dir, base_run, small_vocab_model, tmp_path,
                                                        capsys):
    argv, message = bad_input_cases(dataset_dir, base_run, small_vocab_model, tmp_path)[case]
    metrics_before = (base_run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_info:
        llm_pretrain.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # not progress bars
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert (base_run / "metrics.jsonl").read_text() == metrics_before


def test_bad_input_from_the_command_line_is_one_line(dataset_dir, tmp_path):
    result = subprocess.run([sys.executable, "llm_pretrain.py", *pretrain_args(dataset_dir, tmp_path / "run",
                             "--batch_size", "6", "--grad_accum", "4")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --batch_size 6 must be divisible by --grad_accum 4 x 1 processes; e.g. --batch_size 8"]


def test_cpu_offloaded_optimizer_trains_like_the_plain_one_and_resumes_exactly(dataset_dir, tmp_path):
    """FP32 weights on the CPU: the offloaded FP32 masters are the weights, so the losses follow the plain
    run's (up to float rounding: the global gradient norm sums the tensors in another order)."""
    flags = ["--n_steps", "30", "--ckpt_interval", "15", "--keep_checkpoints", "2", "--optim_kwargs",
             '{"fused": true}', "--grad_accum", "2"]
    llm_pretrain.main(pretrain_args(dataset_dir, tmp_path / "plain", *flags))
    offloaded = tmp_path / "offloaded"
    llm_pretrain.main(pretrain_args(dataset_dir, offloaded, *flags, "--offload_optimizer"))
    metrics = without_timings(read_metrics(offloaded))
    plain = read_metrics(tmp_path / "plain")
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close([m[key] for m in metrics], [m[key] for m in plain], rtol=1e-5, atol=0)
    (offloaded / "checkpoints" / "latest").write_text("step_00000015")
    llm_pretrain.main(["--run_dir", str(offloaded), "--resume"])
    assert without_timings(read_metrics(offloaded)) == metrics


def test_cpu_offload_refuses_several_processes():
    cfg = llm_pretrain.PretrainConfig(dataset_dir="d", offload_optimizer=True)
    with pytest.raises(ConfigError, match="--offload_optimizer runs on one process"):
        check_train_flags(cfg, world_size=2)


# BitNet's ternary weights move in coarse jumps: it trains with larger learning rates.
RECIPE_LR = {"bitnet": "1e-2"}


@pytest.mark.parametrize("recipe", sorted(qt.RECIPES))
def test_each_recipe_learns_checkpoints_its_quantized_state_and_resumes_exactly(recipe, dataset_dir, tmp_path):
    run_dir = tmp_path / recipe
    llm_pretrain.main(pretrain_args(dataset_dir, run_dir, "--quantize", recipe, "--lr", RECIPE_LR.get(recipe, "3e-3"),
                                    "--n_steps", "100", "--eval_interval", "50", "--ckpt_interval", "50",
                                    "--keep_checkpoints", "2"))
    metrics = read_metrics(run_dir)
    # Measured margins below the unigram entropy: 0.6 for the INT8 recipes, 0.18 for BitNet.
    assert metrics[-1]["val_loss"] < unigram_entropy(TokenShards(dataset_dir, "train")) - 0.05
    assert quantized_weights_saved(run_dir / "checkpoints" / "step_00000100")

    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    (resumed / "checkpoints" / "latest").write_text("step_00000050")
    llm_pretrain.main(["--run_dir", str(resumed), "--resume"])
    assert without_timings(read_metrics(resumed)) == without_timings(metrics)


def test_wandb_logs_offline_without_an_account(dataset_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a wandb key
    run_dir = tmp_path / "run"
    llm_pretrain.main(pretrain_args(dataset_dir, run_dir, "--n_steps", "2", "--wandb", "auto"))
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert len(read_metrics(run_dir)) == 2
