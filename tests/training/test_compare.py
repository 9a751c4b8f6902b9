import dataclasses
import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, pretrain_args, read_metrics

import llm_pretrain

sys.path.insert(0, str(REPO / "scripts"))
import compare_runs  # noqa: E402


def fake_run(path, recipe, losses, val_losses, tokens_per_second, memory_gb, dtype="auto", forward_sqnr_db=None):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"quantize": recipe, "dtype": dtype}))
    records = [{"step": i + 1, "tokens_seen": 1000 * (i + 1), "loss": loss, "tokens_per_second": tokens_per_second,
                "max_memory_allocated_gb": memory_gb, **({"val_loss": val_losses[i]} if i in val_losses else {})}
               for i, loss in enumerate(losses)]
    if forward_sqnr_db is not None:  # the loop logs it in a run's first record
        records[0]["forward_sqnr_db"] = forward_sqnr_db
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def table_rows(report):
    return [[c.strip() for c in line.split("|")[1:-1]] for line in report.splitlines()
            if line.startswith("| ") and "---" not in line][1:]


def test_table_and_plot(tmp_path, dataset_dir):
    fake_run(tmp_path / "int8", "int8_mixed_precision", [5.0, 4.0, 3.5], {2: 3.6}, 3000.0, 1.5, forward_sqnr_db=31.24)
    fake_run(tmp_path / "none", "none", [5.0, 3.9, 3.4], {2: 3.5}, 2000.0, 2.0, forward_sqnr_db=55.6)
    # A folder named twice counts once; the baseline comes first, named by its compute dtype (BF16 on the GPU).
    report = compare_runs.main([str(tmp_path / "int8"), str(tmp_path / "none"), "--runs_in", str(tmp_path),
                                "--output_dir", str(tmp_path / "out"), "--dataset_dir", str(dataset_dir),
                                "--note", "made in a test"])
    assert report.startswith("made in a test\n\n")
    assert table_rows(report) == [
        ["none", "bf16", "3,000", "3.4000", "3.5000", "+0.0000", "2,000", "1.00x", "2.00", "55.6"],
        ["int8", "int8_mixed_precision", "3,000", "3.5000", "3.6000", "+0.1000", "3,000", "1.50x", "1.50", "31.2"]]
    assert "Unigram entropy of the training tokens" in report and "Baseline: none (bf16)." in report
    assert (tmp_path / "out" / "comparison.md").read_text() == report
    assert (tmp_path / "out" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("quantize, dtype, on_gpu, name", [
    ("none", "auto", True, "bf16"), ("none", "auto", False, "fp32"), ("none", "fp32_master", False, "bf16"),
    ("none", "fp32", True, "fp32"), ("bf16", "bf16", False, "bf16"),
    ("int8_weight_only", "fp32", False, "int8_weight_only")])
def test_the_baseline_is_named_by_the_dtype_it_computed_in(quantize, dtype, on_gpu, name, tmp_path):
    fake_run(tmp_path / "run", quantize, [5.0, 4.0], {1: 4.1}, 1000.0, 1.0 if on_gpu else None, dtype=dtype)
    assert compare_runs.load_run(tmp_path / "run")["recipe"] == name


def test_a_recipe_run_that_did_not_quantize_is_flagged(tmp_path):
    fake_run(tmp_path / "base", "bf16", [5.0, 4.0], {}, 1000.0, 1.0, forward_sqnr_db=55.6)
    fake_run(tmp_path / "silent", "int8_mixed_precision", [5.0, 4.0], {}, 1000.0, 1.0, forward_sqnr_db=55.6)
    fake_run(tmp_path / "bitnet", "bitnet", [5.0, 4.0], {}, 1000.0, 1.0, forward_sqnr_db=49.99)
    fake_run(tmp_path / "older", "int8_weight_only", [5.0, 4.0], {}, 1000.0, 1.0)  # logged before the SQNR was
    report = compare_runs.main(["--runs_in", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert {row[0]: row[9] for row in table_rows(report)} == {
        "base": "55.6", "bitnet": "50.0", "older": "n/a", "silent": "55.6 (not quantized?)"}
    assert "50 dB or more is no more than rounding to BF16" in report


def test_loss_gaps_compare_validation_losses_where_evaluations_meet_else_training_losses(tmp_path):
    fake_run(tmp_path / "base", "none", [5.0, 4.0, 3.0, 2.0], {1: 4.5, 3: 2.5}, 1000.0, None)
    fake_run(tmp_path / "int8", "int8_weight_only", [5.5, 4.25, 3.0, 1.5], {1: 4.75, 3: 2.0}, 1000.0, None)
    base, int8 = compare_runs.load_run(tmp_path / "base"), compare_runs.load_run(tmp_path / "int8")
    assert compare_runs.loss_gaps([base, int8], base) == ("val_loss", {"int8": [(2000, 0.25), (4000, -0.5)]})
    fake_run(tmp_path / "once", "bitnet", [5.0, 4.5, 3.5, 2.0], {3: 2.0}, 1000.0, None)  # evaluated once
    once = compare_runs.load_run(tmp_path / "once")
    assert compare_runs.loss_gaps([base, int8, once], base) == (
        "loss", {"int8": [(1000, 0.5), (2000, 0.25), (3000, 0.0), (4000, -0.5)],
                 "once": [(1000, 0.0), (2000, 0.5), (3000, 0.5), (4000, 0.0)]})


def run_script(command, env, cwd=REPO):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    result = subprocess.run(["bash", *command], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


SHORT_RUN = "--n_steps 2 --warmup_steps 1 --log_interval 1 --eval_interval 2 --eval_tokens 2048"


def test_quickstart_adds_the_runs_of_other_recipes_to_one_comparison(corpus_file, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(corpus_file, "rt") as f, gzip.open(data / "stdlib_docs.jsonl.gz", "wt") as small:
        small.writelines(itertools.islice(f, 300))
    env = {"DATA_DIR": str(data), "EXTRA_ARGS": SHORT_RUN}
    out = tmp_path / "quickstart"
    run_script(["scripts/quickstart.sh", str(out)], {**env, "RECIPES": "none"})
    run_script(["scripts/quickstart.sh", str(out)], {**env, "RECIPES": "int8_weight_only"})
    rows = table_rows((out / "comparison.md").read_text())
    baseline = "bf16" if torch.cuda.is_available() else "fp32"
    assert [row[:2] for row in rows] == [[baseline, baseline], ["int8_weight_only", "int8_weight_only"]]
    assert [row[2] for row in rows] == ["4,096", "4,096"] and rows[0][5] == "+0.0000"
    # Each run logged the forward SQNR of a linear against its float64 twin: an INT8 weight's error for the recipe,
    # FP32 rounding (or BF16's, on a GPU) for the baseline, which is not flagged.
    assert float(rows[1][9]) < 50 and float(rows[0][9]) > 50


def test_a_wandb_offline_run_reads_like_its_metrics_file(dataset_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    flags = ["--n_steps", "6", "--ckpt_interval", "3", "--keep_checkpoints", "2", "--wandb", "offline",
             "--quantize", "int8_weight_only"]
    llm_pretrain.main(pretrain_args(dataset_dir, run_dir, *flags))
    # Resume from step 3: wandb's second segment logs steps 4-6 again, which must replace the first's.
    (run_dir / "checkpoints" / "latest").write_text("step_00000003")
    time.sleep(1.1)  # offline-run folders are named to the second
    llm_pretrain.main(["--run_dir", str(run_dir), "--resume"])
    # run.finish() only asks wandb's service to close the run's file (CI once read the second segment before it
    # was written); a CLI run's exit waits for it through teardown, as this does.
    wandb.teardown()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    wandb_only = tmp_path / "wandb_only"
    shutil.copytree(run_dir / "wandb", wandb_only / "wandb")

    run = compare_runs.load_run(wandb_only)
    assert run["recipe"] == "int8_weight_only"
    assert run["records"] == read_metrics(run_dir)
    segment = sorted((run_dir / "wandb").glob("offline-run-*"))[-1]
    assert [r["step"] for r in compare_runs.load_run(segment)["records"]] == [4, 5, 6]


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "scripts/compare_runs.py", str(tmp_path), "--output_dir",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no metrics.jsonl and no wandb offline run; is it a run directory of llm_pretrain.py?"]


def test_a_sweep_groups_its_wandb_runs_and_records_each_recipe_with_its_options(dataset_dir, tmp_path):
    pytest.importorskip("wandb")
    import qt
    config = tmp_path / "tiny_sweep.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", "seq_len": 64, "batch_size": 16, "wandb": "offline"}))
    env = {"DATA_DIR": str(dataset_dir), "RUNS_DIR": str(tmp_path / "runs"), "EXTRA_ARGS": SHORT_RUN,
           "WANDB_API_KEY": ""}
    run_script(["scripts/sweep_recipes.sh", str(config), str(tmp_path / "out"), "fp32", "int8_weight_only"], env)
    int8_options = dataclasses.asdict(qt.resolve_recipe("int8_weight_only"))  # every option, defaults included
    for recipe, options in (("fp32", {}), ("int8_weight_only", int8_options)):
        (wandb_file,) = (tmp_path / "runs" / "tiny_sweep" / recipe).glob("wandb/offline-run-*/run-*.wandb")
        run = next(message for kind, message in compare_runs.read_wandb_records(wandb_file) if kind == "run")
        assert (run.run_group, list(run.tags)) == ("tiny_sweep", ["sweep", "fp32+int8_weight_only"])
        config_values = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert (config_values["recipe"], config_values["recipe_options"]) == (recipe, options)
    assert [row[1] for row in table_rows((tmp_path / "out" / "comparison.md").read_text())] == [
        "fp32", "int8_weight_only"]
