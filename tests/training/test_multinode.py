"""Several nodes, simulated on one machine: two torchrun launchers with --nnodes 2 and one CPU process each
(gloo) meet through a c10d rendezvous as on two nodes, so one node's process has RANK 1 and LOCAL_RANK 0;
launched directly and through scripts/slurm_pretrain.sh. Also: which environment variable picks what, and the
run directory every node must share."""

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, pretrain_args, read_metrics

import llm_pretrain
from qt.training.config import ConfigError
from qt.training.distributed import Dist, check_run_dir_shared, init_distributed
from tests.rendezvous import rendezvous_file

N_STEPS = 6
HEADER = "tiny-none: "  # the line llm_pretrain.py prints (on rank 0) before training

FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: the command once per node, with node N's stdout and stderr in $SRUN_OUTPUT.N.{out,err}
while [[ $1 == -* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do
    "$@" > "$SRUN_OUTPUT.$node.out" 2> "$SRUN_OUTPUT.$node.err" &
done
status=0
for job in $(jobs -p); do wait "$job" || status=$?; done
[[ $status == 0 ]] || tail -n 30 "$SRUN_OUTPUT".*.err >&2
exit $status
"""


@contextmanager
def rendezvous_port():
    """A port for --rdzv_endpoint 127.0.0.1:PORT, on which this process already serves the c10d rendezvous
    store: the OS picks it as the store binds, so no other socket can take it first (as it could a port
    merely found free). The launchers, finding it taken, join the store as clients, which is how torchrun
    handles several launchers on one machine. The rest is as on real nodes: the launcher that becomes rank 0
    serves the store the training processes meet through, on a port it binds itself."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield store.port
    del store


def run_nodes(commands: list[list[str]], env: dict, timeout=300) -> list[tuple[str, str]]:
    """Run one launcher command per node at once; (stdout, stderr) of each. All must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    nodes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for command in commands]
    try:
        outputs = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:  # a launcher that did not return may leave its training processes behind
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return outputs


def launch_two_nodes(*args) -> list[str]:
    """`torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT
    llm_pretrain.py ARGS` once per simulated node; each node's stdout."""
    with rendezvous_port() as port:
        command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nnodes", "2", "--nproc_per_node",
                   "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "llm_pretrain.py", *args]
        return [stdout for stdout, _ in run_nodes([command] * 2, env={})]


def submit_to_fake_slurm(tmp_path, *args) -> list[str]:
    """scripts/slurm_pretrain.sh ARGS as a 2-node job of one CPU "GPU" each would run it, with srun and
    scontrol played by stand-ins that run every node's task on this machine; each node's stdout."""
    bin_dir = tmp_path / "fake_slurm"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")  # `show hostnames`: the first node
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    output = tmp_path / "node"
    with rendezvous_port() as port:
        env = {"PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "SRUN_OUTPUT": str(output),
               "SLURM_SUBMIT_DIR": str(REPO), "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]",
               "SLURM_JOB_ID": "1", "SLURM_GPUS_ON_NODE": "1", "RDZV_PORT": str(port)}
        run_nodes([["bash", "scripts/slurm_pretrain.sh", *args]], env)
    return [output.with_name(f"node.{node}.out").read_text() for node in range(2)]


def assert_only_rank_0_prints(node_stdouts: list[str]):
    """Rank 0 (LOCAL_RANK 0 on one node) prints and logs; rank 1 (LOCAL_RANK 0 on the other) is silent.
    A process taking LOCAL_RANK 0 for "main" would also log, and write the run's files alongside rank 0."""
    printing = [stdout for stdout in node_stdouts if HEADER in stdout]
    assert len(printing) == 1 and f"step {N_STEPS}/{N_STEPS}" in printing[0], node_stdouts
    assert sorted(node_stdouts, key=len)[0] == "", node_stdouts


def test_two_nodes_train_like_one_process_and_resume_exactly(dataset_dir, tmp_path, monkeypatch):
    """Trained as a SLURM job through scripts/slurm_pretrain.sh, resumed with plain torchrun per node."""
    monkeypatch.setenv("HOME", str(tmp_path))  # wandb offline: no account, no files outside tmp_path
    run_dir = tmp_path / "two_nodes"
    assert_only_rank_0_prints(submit_to_fake_slurm(
        tmp_path, *pretrain_args(dataset_dir, run_dir, "--n_steps", str(N_STEPS), "--ckpt_interval", "3",
                                 "--keep_checkpoints", "2", "--wandb", "offline")))
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, N_STEPS + 1))
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoints", "config.yaml", "metrics.jsonl",
                                                         "wandb", "wandb_run_id"]
    assert sorted(p.name for p in (run_dir / "checkpoints" / f"step_{N_STEPS:08d}").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "rank_0.pt", "rank_1.pt"]

    # The same data as one process: each rank takes its half of every global batch.
    single = tmp_path / "single"
    llm_pretrain.main(pretrain_args(dataset_dir, single, "--n_steps", str(N_STEPS)))
    for m, r in zip(metrics, read_metrics(single), strict=True):
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-4) and m["tokens_seen"] == r["tokens_seen"]

    resumed = tmp_path / "two_nodes_resumed"
    shutil.copytree(run_dir, resumed)
    (resumed / "checkpoints" / "latest").write_text("step_00000003")
    assert_only_rank_0_prints(launch_two_nodes("--run_dir", str(resumed), "--resume"))
    for m, r in zip(read_metrics(resumed), metrics, strict=True):
        assert (m["step"], m["loss"], m.get("val_loss"), m["grad_norm"]) == (
            r["step"], r["loss"], r.get("val_loss"), r["grad_norm"])


def _check_run_dirs(rank: int, init_method: str, cases: dict, outcomes):
    """check_run_dir_shared on rank `rank` of 2 for each case (a run_dir per rank); its outcome per case."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        for case, run_dirs in cases.items():
            try:
                check_run_dir_shared(run_dirs[rank], Dist(rank, 2, torch.device("cpu")))
                outcomes[case, rank] = "ok"
            except ConfigError as e:
                outcomes[case, rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_a_run_dir_not_shared_by_every_process_stops_them_all_with_one_line(tmp_path):
    """A node-local --run_dir on several nodes (simulated: a folder per process) would have each rank fail on
    its own (rank 1 saving into a checkpoint folder only rank 0 made), or, with --resume, find no saved
    config on rank 1 only, while the others wait for it in a collective."""
    (tmp_path / "a_file").touch()
    cases = {"shared": [str(tmp_path / "run")] * 2,
             "node-local": [str(tmp_path / "node0" / "run"), str(tmp_path / "node1" / "run")],
             "not writable": [str(tmp_path / "a_file" / "run")] * 2}
    with mp.Manager() as manager:
        outcomes = manager.dict()
        mp.spawn(_check_run_dirs, args=(rendezvous_file(tmp_path), cases, outcomes), nprocs=2)
        outcomes = dict(outcomes)
    assert outcomes["shared", 0] == outcomes["shared", 1] == "ok"
    assert list((tmp_path / "run").iterdir()) == []  # the check leaves nothing behind
    for rank in (0, 1):
        assert outcomes["node-local", rank].startswith(
            f"--run_dir {cases['node-local'][rank]} is not one folder shared by every process: rank(s) [1] do not "
            "see the file rank 0 wrote there")
        assert outcomes["not writable", rank].startswith(f"--run_dir {cases['not writable'][0]}: rank 0 could not "
                                                         "write there")
    assert "(Not a directory)" in outcomes["not writable", 0]


def test_local_rank_picks_the_gpu_and_rank_picks_the_main_process(monkeypatch):
    """On the second of two 4-GPU nodes, global rank 5 is the node's second process: GPU 1, not main."""
    for name, value in {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    devices, backends = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", backends.append)
    info = init_distributed()
    assert info == Dist(rank=5, world_size=8, device=torch.device("cuda", 1)) and not info.is_main
    assert devices == [torch.device("cuda", 1)] and backends == ["nccl"]
