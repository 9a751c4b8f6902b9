"""Faults injected into checkpoints and run directories: a crash between any two file operations of a save, a
deleted `latest`, damaged checkpoint files, a full disk, a torn metrics line, two processes on one directory,
a run without config.yaml. None of them may lose a run or end in a traceback."""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import without_timings
from test_loop import SINGLE, RegressionBatches, config, mse
from torch import nn

from qt.training import checkpoint
from qt.training.checkpoint import CheckpointError, Checkpointer, resolve_run_config
from qt.training.config import ConfigError, TrainingError
from qt.training.loop import train
from qt.training.metrics import read_metrics


class Crash(BaseException):
    """A kill at this point: nothing of the save's own error handling runs."""


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    return model, torch.optim.AdamW(model.parameters())


def save_with_weight(checkpointer, step, model, optimizer, value):
    with torch.no_grad():
        model.weight.fill_(value)
    checkpointer.save(step, model, optimizer, {"value": value})


FILE_OPERATIONS = [(os, "fsync"), (os, "replace"), (os, "rename"), (os, "mkdir"), (shutil, "rmtree"),
                   (checkpoint._HashingWriter, "write")]


def count_file_operations(monkeypatch, crash_at=None) -> list:
    """Count the calls to FILE_OPERATIONS from now on; the call number `crash_at` raises Crash instead."""
    calls = []
    for owner, name in FILE_OPERATIONS:
        original = getattr(owner, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) - 1 == crash_at:
                raise Crash
            return _original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_a_kill_between_any_two_file_operations_of_a_save_leaves_an_intact_checkpoint(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        model, optimizer = model_and_optimizer()
        save_with_weight(Checkpointer(tmp_path / "count", SINGLE, sharded=False, keep=1), 1, model, optimizer, 1.0)
        operations = count_file_operations(patch)
        save_with_weight(Checkpointer(tmp_path / "count", SINGLE, sharded=False, keep=1), 2, model, optimizer, 2.0)
    assert len(operations) > 10  # files, manifest, directory, rename, latest, pruning
    for crash_at in range(len(operations)):
        run_dir = tmp_path / f"crash_{crash_at}"
        model, optimizer = model_and_optimizer()
        save_with_weight(Checkpointer(run_dir, SINGLE, sharded=False, keep=1), 1, model, optimizer, 1.0)
        with monkeypatch.context() as patch:
            count_file_operations(patch, crash_at=crash_at)
            # torch.save reports a failed write as a RuntimeError, which the save reports as a CheckpointError
            with pytest.raises((Crash, CheckpointError)):
                save_with_weight(Checkpointer(run_dir, SINGLE, sharded=False, keep=1), 2, model, optimizer, 2.0)
        fresh_model, fresh_optimizer = model_and_optimizer(seed=1)
        checkpointer = Checkpointer(run_dir, SINGLE, sharded=False, keep=1)
        restored = checkpointer.load(fresh_model, fresh_optimizer)
        assert restored.step in (1, 2), operations[crash_at]
        assert restored.extra["value"] == restored.step  # the weights of the step it names
        assert torch.all(fresh_model.weight == restored.step), operations[crash_at]
        checkpointer.save(3, fresh_model, fresh_optimizer, {})  # the next save clears the debris
        assert sorted(p.name for p in checkpointer.dir.iterdir()) == ["latest", "step_00000003"]


def regression_run(run_dir, **overrides):
    model, optimizer = model_and_optimizer()
    return train(model=model, optimizer=optimizer, batches=RegressionBatches(), loss_fn=mse,
                 cfg=config(run_dir, **{"n_steps": 20, "ckpt_interval": 5, "keep_checkpoints": 4, **overrides}),
                 dist_info=SINGLE, tokens_per_step=16)


def checkpoint_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name != "latest")


def test_a_missing_latest_resumes_from_the_newest_checkpoint_and_deletes_nothing(tmp_path, capsys):
    regression_run(tmp_path)
    (tmp_path / "checkpoints" / "latest").unlink()
    before = read_metrics(tmp_path / "metrics.jsonl")
    regression_run(tmp_path, resume=True, n_steps=30)
    err = capsys.readouterr().err
    assert "latest is missing or unreadable; resuming from the newest intact checkpoint" in err
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 31)) and metrics[:20] == before
    assert checkpoint_names(tmp_path) == ["step_00000015", "step_00000020", "step_00000025", "step_00000030"]


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(data)


DAMAGES = {
    "truncated": (truncate, "{} has"),
    "zero bytes": (lambda path: path.write_bytes(b""), "{} has 0 bytes"),
    "garbage": (lambda path: path.write_bytes(os.urandom(path.stat().st_size)), "{} does not match its SHA-256"),
    "bit flip": (flip_a_bit, "{} does not match its SHA-256"),
    "missing file": (lambda path: path.unlink(), "{}: No such file"),
    "not json": (lambda path: path.write_text("{not json"), "manifest.json is unreadable"),
}
# Each damage to each of a checkpoint's files (each rank's RNG states and loop position, DCP's metadata and its
# tensors), and a manifest that is no JSON.
DAMAGED_FILES = [("not json", "manifest.json")] + [
    (damage, file) for damage in sorted(DAMAGES) if damage != "not json"
    for file in ["rank_0.pt", ".metadata", "__0_0.distcp"]]


@pytest.mark.parametrize("damage, file", DAMAGED_FILES)
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one_with_a_warning(tmp_path, damage, file, capsys):
    model, optimizer = model_and_optimizer()
    checkpointer = Checkpointer(tmp_path, SINGLE, sharded=False, keep=2)
    save_with_weight(checkpointer, 1, model, optimizer, 1.0)
    save_with_weight(checkpointer, 2, model, optimizer, 2.0)
    spoil, problem = DAMAGES[damage]
    problem = problem.format(file)
    spoil(checkpointer.dir / "step_00000002" / file)
    restored = checkpointer.load(model, optimizer)
    assert restored.step == 1 and torch.all(model.weight == 1.0)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint step_00000002 is damaged" in warnings[0] and problem in warnings[0]

    spoil(checkpointer.dir / "step_00000001" / file)
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*step_00000002: .*; step_00000001: ") as error:
        checkpointer.load(model, optimizer)
    assert "\n" not in str(error.value)


def rank_file_writes_fail(monkeypatch):
    """Writes to a rank's file fail with ENOSPC once 1000 bytes have been written."""
    written = [0]
    original = checkpoint._HashingWriter.write

    def write(self, data):
        written[0] += len(data)
        if written[0] > 1000:
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error
        return original(self, data)
    monkeypatch.setattr(checkpoint._HashingWriter, "write", write)


def fsyncs_fail(monkeypatch):
    """The first fsync of a save, DCP's of its tensors' file, fails with ENOSPC (where a network filesystem
    reports a full disk)."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("full_disk", [rank_file_writes_fail, fsyncs_fail])
def test_a_full_disk_during_a_save_says_so_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                         full_disk):
    model, optimizer = model_and_optimizer()
    checkpointer = Checkpointer(tmp_path, SINGLE, sharded=False, keep=1)
    save_with_weight(checkpointer, 1, model, optimizer, 1.0)
    with monkeypatch.context() as patch:
        full_disk(patch)
        with pytest.raises(CheckpointError) as error:
            save_with_weight(checkpointer, 2, model, optimizer, 2.0)
    assert re.fullmatch(r"could not save checkpoint step_00000002 .*: no space left on device; the previous "
                        r"checkpoint \(step_00000001\) is kept", str(error.value))
    assert sorted(p.name for p in checkpointer.dir.iterdir()) == ["latest", "step_00000001"]
    assert checkpointer.load(model, optimizer).step == 1 and torch.all(model.weight == 1.0)


def test_a_full_disk_while_logging_stops_the_run_in_one_line(tmp_path, monkeypatch):
    from qt.training.metrics import MetricsLogger
    original = MetricsLogger.log

    def log(self, record):
        if record["step"] == 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(self, record)
    monkeypatch.setattr(MetricsLogger, "log", log)
    with pytest.raises(TrainingError, match=r"no space left on device .*; the last checkpoint is .*step_00000010: "
                                            r"free space and continue with --resume") as error:
        regression_run(tmp_path)
    assert "\n" not in str(error.value)


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    regression_run(tmp_path)
    metrics_file = tmp_path / "metrics.jsonl"
    complete = read_metrics(metrics_file)
    metrics_file.write_text(metrics_file.read_text() + '{"step": 21, "loss": 0.3')  # a full disk tore the last write
    (tmp_path / "checkpoints" / "latest").write_text("step_00000015")
    regression_run(tmp_path, resume=True)
    assert without_timings(read_metrics(metrics_file)) == without_timings(complete)
    assert metrics_file.read_text().endswith("}\n")


def test_a_crash_while_truncating_the_metrics_on_resume_leaves_them_whole(tmp_path, monkeypatch):
    regression_run(tmp_path)
    metrics_file = tmp_path / "metrics.jsonl"
    complete = metrics_file.read_text()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000015")
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(Crash))
    with pytest.raises(Crash):
        regression_run(tmp_path, resume=True)
    assert metrics_file.read_text() == complete


LOCK_HOLDER = """
import sys, time
from qt.training.checkpoint import RunDirLock
from qt.training.distributed import Dist
import torch
with RunDirLock(sys.argv[1], Dist(0, 1, torch.device("cpu"))):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_process_on_a_run_directory_is_refused_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(CheckpointError, match=f"is in use by another run \\(process {holder.pid} on .*\\)"):
            regression_run(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    regression_run(tmp_path)  # the kernel released the killed holder's lock
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 20


def test_the_checkpoint_carries_its_config_for_a_run_without_config_yaml(tmp_path):
    regression_run(tmp_path, seed=3)
    (tmp_path / "config.yaml").unlink()
    cfg = config(tmp_path, resume=True, seed=4)
    default_name = lambda cfg: "regression"  # noqa: E731
    with pytest.raises(ConfigError, match=r"cannot resume with a different config \(seed: 3 -> 4\)"):
        resolve_run_config(cfg, {"run_dir", "resume", "seed"}, default_name)
    resumed = resolve_run_config(config(tmp_path, resume=True), {"run_dir", "resume"}, default_name)
    assert resumed.seed == 3


def test_a_run_over_existing_checkpoints_without_resume_is_refused(tmp_path):
    regression_run(tmp_path)
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        regression_run(tmp_path)
    assert checkpoint_names(tmp_path) == ["step_00000005", "step_00000010", "step_00000015", "step_00000020"]


def test_a_resume_with_a_lower_lr_is_noted_in_the_log(tmp_path, capsys):
    regression_run(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010")
    regression_run(tmp_path, resume=True, lr=0.01)
    assert ("resumed from " + str(tmp_path / "checkpoints" / "step_00000010") + " at step 10; with changed "
            "settings: lr 0.05 -> 0.01") in capsys.readouterr().out


def test_resuming_a_finished_run_says_it_is_complete_and_trains_nothing(tmp_path, capsys):
    last = regression_run(tmp_path)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert regression_run(tmp_path, resume=True) == last
    out = capsys.readouterr().out
    assert f"{tmp_path} is already complete: its checkpoint step_00000020 is at step 20 of 20; nothing to train" in out
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_a_first_run_started_with_resume_says_nothing_about_checkpoints(tmp_path, capsys):
    regression_run(tmp_path, resume=True)
    captured = capsys.readouterr()
    assert "checkpoint" not in captured.out + captured.err
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 20


def test_a_process_forked_during_a_run_does_not_keep_its_lock(tmp_path):
    """DataLoader workers are forked while the run holds its lock and may outlive it; the same process must
    then be able to lock the run directory again (a stopped run resumed in-process: timm_finetune's tests)."""
    from qt.training.checkpoint import RunDirLock
    from qt.training.distributed import Dist

    dist_info = Dist(0, 1, torch.device("cpu"))
    with RunDirLock(tmp_path, dist_info):
        child = os.fork()
        if child == 0:  # a worker that inherited the lock file's descriptor and is still alive afterwards
            time.sleep(30)
            os._exit(0)
    try:
        with RunDirLock(tmp_path, dist_info):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
