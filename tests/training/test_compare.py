import json
import shutil
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, pretrain_args, read_metrics

import llm_pretrain

sys.path.insert(0, str(REPO / "scripts"))
import compare_runs  # noqa: E402


def fake_run(path, recipe, losses, val_losses, tokens_per_second, memory_gb):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"quantize": recipe}))
    records = [{"step": i + 1, "tokens_seen": 1000 * (i + 1), "loss": loss, "tokens_per_second": tokens_per_second,
                "max_memory_allocated_gb": memory_gb, **({"val_loss": val_losses[i]} if i in val_losses else {})}
               for i, loss in enumerate(losses)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_table_and_plot(tmp_path, dataset_dir):
    fake_run(tmp_path / "int8", "int8_mixed_precision", [5.0, 4.0, 3.5], {2: 3.6}, 3000.0, 1.5)
    fake_run(tmp_path / "bf16", "none", [5.0, 3.9, 3.4], {2: 3.5}, 2000.0, 2.0)
    report = compare_runs.main([str(tmp_path / "int8"), str(tmp_path / "bf16"), "--output_dir", str(tmp_path / "out"),
                                "--dataset_dir", str(dataset_dir)])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in report.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["int8"] == ["int8_mixed_precision", "3,000", "3.5000", "3.6000", "+0.1000", "3,000", "1.50x", "1.50"]
    assert rows["bf16"] == ["none", "3,000", "3.4000", "3.5000", "+0.0000", "2,000", "1.00x", "2.00"]
    assert "Unigram entropy of the training tokens" in report
    assert (tmp_path / "out" / "comparison.md").read_text() == report
    assert (tmp_path / "out" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_wandb_offline_run_reads_like_its_metrics_file(dataset_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    flags = ["--n_steps", "6", "--ckpt_interval", "3", "--keep_checkpoints", "2", "--wandb", "offline",
             "--quantize", "int8_weight_only"]
    llm_pretrain.main(pretrain_args(dataset_dir, run_dir, *flags))
    # Resume from step 3: wandb's second segment logs steps 4-6 again, which must replace the first's.
    (run_dir / "checkpoints" / "latest").write_text("step_00000003")
    time.sleep(1.1)  # offline-run folders are named to the second
    llm_pretrain.main(["--run_dir", str(run_dir), "--resume"])
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
