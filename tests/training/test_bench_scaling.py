"""scripts/bench_scaling.py on CPU processes (gloo): its runs, its tables, and a resume on fewer processes."""

import json
import subprocess
import sys

import yaml
from conftest import REPO

from qt.sqnr import NOT_QUANTIZED_DB

TINY = {"model": "tiny", "seq_len": 64, "batch_size": 8, "n_steps": 6, "lr": 3e-3, "warmup_steps": 2,
        "dtype": "fp32", "log_interval": 2, "eval_interval": 0, "save_checkpoints": False, "wandb": "disabled"}


MIXED_INT8_GATHER = 'int8_mixed_precision:{"int8_all_gather": true}'  # a recipe with options


def test_scaling_and_resume_on_fewer_processes(tmp_path, dataset_dir):
    config, resume_config = tmp_path / "scaling.yaml", tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(TINY))
    resume_config.write_text(yaml.safe_dump({**TINY, "batch_size": 16}))
    output = tmp_path / "scaling.md"
    subprocess.run([sys.executable, "scripts/bench_scaling.py", "--dataset_dir", str(dataset_dir), "--config",
                    str(config), "--gpus", "1", "2", "--cpu_processes", "2", "--recipes", "fp32",
                    MIXED_INT8_GATHER, "--resume_config", str(resume_config), "--resume_recipes",
                    "int8_mixed_precision", "--runs_dir", str(tmp_path / "runs"), "--output", str(output)],
                   cwd=REPO, check=True, timeout=600)
    results = json.loads(output.with_suffix(".json").read_text())
    scaling = {(row["recipe"], row["gpus"]): row for row in results["scaling"]}
    assert set(scaling) == {("fp32", 1), ("fp32", 2), (MIXED_INT8_GATHER, 1), (MIXED_INT8_GATHER, 2)}
    for row in scaling.values():
        assert row["status"] == 0 and row["tok_s"] > 0 and row["efficiency"] > 0 and 0 < row["slowest_vs_median"] <= 1
    assert scaling[("fp32", 1)]["efficiency"] == 1.0 and scaling[("fp32", 2)]["vs_baseline"] == 1.0
    # Each recipe run proves it quantized: its logged forward SQNR, in the JSON and in its table row.
    for gpus in (1, 2):
        sqnr = scaling[(MIXED_INT8_GATHER, gpus)]["forward_sqnr_db"]
        assert 20 < sqnr < NOT_QUANTIZED_DB
        assert f"| {sqnr:.1f} |" in output.read_text()
    # 40 steps on 2 processes, then from the checkpoint at step 20 on 1 (two micro-steps a step): the same
    # global batch, so the same losses up to the order of the reductions.
    (resumed,) = results["resume"]
    assert resumed["gpus"] == 1 and resumed["steps"] == [25, 30, 35, 40]
    assert resumed["max_abs_diff"] < 1e-3
    assert "| int8_mixed_precision | 1 GPU(s) | 25-40 |" in output.read_text()


def test_repeated_runs_give_the_median_and_each_runs_speedup_against_the_baselines_run_of_its_turn(monkeypatch):
    """--repeats: a row per recipe and GPU count with the median run's tok/s, every run's, and each run's speedup
    against the baseline's run of the same turn; a failed run is named, the others still count."""
    from pathlib import Path

    from scripts import bench_scaling

    tok_s = {("bf16", 1): [100.0, 110.0, 90.0], ("bitnet", 1): [120.0, 121.0, 117.0],
             ("bf16", 2): [180.0, 190.0, 170.0], ("bitnet", 2): [200.0, None, 170.0]}
    jobs = [bench_scaling.Job(recipe, recipe, gpus, [], Path(f"{recipe}-{gpus}-{repeat}"), repeat=repeat)
            for (recipe, gpus), runs in tok_s.items() for repeat in range(len(runs))]

    def figures(job):
        value = tok_s[(job.recipe, job.gpus)][job.repeat]
        if value is None:
            return {"status": 1}
        return {"status": 0, "tok_s": value, "peak_memory_gb": value / 10, "slowest_vs_median": 0.9 + job.repeat / 100,
                "forward_sqnr_db": None if job.recipe == "bf16" else 5.8, "host_wait_ms": 10.0 * job.repeat}

    monkeypatch.setattr(bench_scaling, "run_figures", figures)
    lines, rows = bench_scaling.scaling_table(jobs)
    by_key = {(row["recipe"], row["gpus"]): row for row in rows}
    bitnet_2 = by_key[("bitnet", 2)]
    assert bitnet_2["tok_s"] == 185.0 and bitnet_2["peak_memory_gb"] == 20.0 and bitnet_2["slowest_vs_median"] == 0.9
    assert bitnet_2["vs_baseline"] == 185.0 / 180.0 and bitnet_2["host_wait_ms"] == 10.0  # runs 1 and 3: 0, 20
    assert bitnet_2["vs_baseline_runs"] == [200.0 / 180.0, None, 1.0]
    assert by_key[("bitnet", 1)]["efficiency"] == 1.0 and bitnet_2["efficiency"] == 185.0 / (2 * 120.0)
    assert lines[0].endswith("| tok/s of each of 3 runs | vs the baseline, each run |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[-1].endswith("| 200 / failed (exit 1) / 170 | 1.11 / - / 1.00 |")


def test_a_spec_sets_environment_variables_and_flags_for_its_runs_only(monkeypatch, tmp_path):
    """'NAME=VALUE ... RECIPE[:OPTIONS_JSON] --FLAG ...': the variables reach that spec's runs (and no other's), the
    recipe, its options (spaces in the JSON kept) and its flags reach llm_pretrain.py's arguments, the flags last;
    a baseline with variables or flags is not the baseline."""
    from pathlib import Path

    from scripts import bench_scaling
    from scripts.bench_scaling import Spec

    spec = 'QT_PROBE=1 OTHER=a=b bitnet:{"int8_backward": false} --fsdp_unit_blocks 4 --no-fsdp_reshard_after_forward'
    assert Spec.parse(spec) == Spec({"QT_PROBE": "1", "OTHER": "a=b"}, "bitnet", '{"int8_backward": false}',
                                    ["--fsdp_unit_blocks", "4", "--no-fsdp_reshard_after_forward"])
    assert Spec.parse("bf16") == Spec({}, "bf16", "", []) and Spec.parse("bf16").is_baseline
    assert not any(Spec.parse(s).is_baseline for s in ("X=1 bf16", "bf16 --fsdp_unit_blocks 4", "bitnet"))
    assert Spec.parse("X=1").recipe == "X=1"  # no recipe after it: left for llm_pretrain.py to reject

    class Args:
        recipes, gpus, repeats, runs_dir = [spec], [2], 1, tmp_path
        config, dataset_dir, extra_args = Path("c.yaml"), Path("data"), ["--n_steps", "40", "--fsdp_unit_blocks", "1"]

    (job,) = bench_scaling.scaling_jobs(Args, per_gpu_batch=8)
    assert job.args[4:8] == ["--quantize", "bitnet", "--quantize_kwargs", '{"int8_backward": false}']
    assert job.args[-7:] == ["--n_steps", "40", "--fsdp_unit_blocks", "1", *Spec.parse(spec).flags]

    probe = "import os, sys; sys.exit(0 if os.environ.get('QT_PROBE') == '1' else 3)"
    monkeypatch.setattr(bench_scaling, "command", lambda job: [sys.executable, "-c", probe])
    jobs = [bench_scaling.Job(name, name, 1, [], tmp_path / bench_scaling.dir_name(name)) for name in (spec, "bitnet")]
    bench_scaling.run_jobs(jobs, n_gpus=1, timeout_s=60, time_budget_s=60)
    assert [job.status for job in jobs] == [0, 3]

    runs = {"bf16": 100.0, "QT_PROBE=1 bf16": 90.0}
    jobs = [bench_scaling.Job(name, name, 1, [], tmp_path / name) for name in runs]
    monkeypatch.setattr(bench_scaling, "run_figures", lambda job: {
        "status": 0, "tok_s": runs[job.recipe], "peak_memory_gb": 1.0, "slowest_vs_median": 1.0,
        "forward_sqnr_db": NOT_QUANTIZED_DB + 5})
    lines, rows = bench_scaling.scaling_table(jobs)
    assert [row["vs_baseline"] for row in rows] == [1.0, 0.9]
    assert "not quantized?" not in "\n".join(lines)  # BF16 with a variable is still BF16, not a failed recipe
