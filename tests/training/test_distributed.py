"""Two CPU processes (gloo) under torchrun: FSDP2 and DDP train on the same data as one process does,
and an FSDP2 run resumes bit-exactly from its sharded checkpoint."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, pretrain_args, read_metrics

import llm_pretrain

N_STEPS = 6


def torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "llm_pretrain.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def single_process_run(dataset_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    llm_pretrain.main(pretrain_args(dataset_dir, run_dir, "--n_steps", str(N_STEPS)))
    return run_dir


def assert_same_losses(run_dir, reference_dir):
    metrics, reference = read_metrics(run_dir), read_metrics(reference_dir)
    assert [m["step"] for m in metrics] == list(range(1, N_STEPS + 1))
    for m, r in zip(metrics, reference):
        # Each process takes half of the same global batch: only the summation order differs.
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-4)
        assert m["tokens_seen"] == r["tokens_seen"]


def test_fsdp2_matches_one_process_and_resumes_exactly(dataset_dir, single_process_run, tmp_path):
    run_dir = tmp_path / "fsdp"
    torchrun(*pretrain_args(dataset_dir, run_dir, "--n_steps", str(N_STEPS), "--ckpt_interval", "3",
                            "--keep_checkpoints", "2"))
    assert_same_losses(run_dir, single_process_run)
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_00000006").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "rank_0.pt", "rank_1.pt"]

    resumed = tmp_path / "fsdp_resumed"
    shutil.copytree(run_dir, resumed)
    (resumed / "checkpoints" / "latest").write_text("step_00000003")
    torchrun("--run_dir", str(resumed), "--resume")
    for m, r in zip(read_metrics(resumed), read_metrics(run_dir)):
        assert (m["step"], m["loss"], m.get("val_loss"), m["grad_norm"]) == (
            r["step"], r["loss"], r.get("val_loss"), r["grad_norm"])


def test_ddp_matches_one_process(dataset_dir, single_process_run, tmp_path):
    run_dir = tmp_path / "ddp"
    torchrun(*pretrain_args(dataset_dir, run_dir, "--n_steps", str(N_STEPS), "--ddp", "--grad_accum", "2"))
    assert_same_losses(run_dir, single_process_run)
