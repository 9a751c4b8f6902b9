"""--async_checkpoint: a save copies the states and returns; a background thread writes them and publishes the
checkpoint (manifest, rename, `latest`) only once the write succeeded; one save is in flight at a time. (Saving
on 2 processes in the background: tests/training/test_reshard.py.)"""

import threading
import time

import numpy as np
import pytest
import torch
from test_loop import SINGLE, RegressionBatches, config, mse
from test_reshard import train_step
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemWriter

import qt
from qt.training import checkpoint
from qt.training.checkpoint import CheckpointError, Checkpointer
from qt.training.loop import train


def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 8), nn.Linear(8, 4))
    qt.quantize_(model, "int8_weight_only")
    optimizer = qt.optim.AdamW8bit(model.parameters(), lr=1e-2)
    train_step(model, optimizer)
    return model, optimizer


class HeldBackground:
    """The saves handed to the background thread start only at `release()`; `started` counts them."""

    def __init__(self, monkeypatch):
        self.gate, self.started = threading.Event(), 0
        original = checkpoint._in_background

        def in_background(work):
            self.started += 1
            return original(lambda: self.gate.wait(timeout=60) and work())
        monkeypatch.setattr(checkpoint, "_in_background", in_background)

    def release(self):
        self.gate.set()


def saved_files(checkpoint, tmp_path):
    """Every tensor and value a checkpoint holds: its DCP state and each rank file, by file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    converted = tmp_path / f"{checkpoint.parent.parent.name}.pt"
    dcp_to_torch_save(checkpoint, converted)
    return {"dcp": torch.load(converted, weights_only=False), "rank_0.pt": torch.load(checkpoint / "rank_0.pt",
                                                                                          weights_only=False)}


def assert_equal(a, b, where=""):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}.{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert (a == b).all(), where
    else:
        assert a == b, where


def test_an_asynchronous_save_writes_what_a_synchronous_one_does_while_training_goes_on(tmp_path, monkeypatch):
    model, optimizer = trained()
    rng = torch.get_rng_state()
    Checkpointer(tmp_path / "sync", SINGLE, sharded=False, keep=1).save(1, model, optimizer, {"at": 1})
    torch.set_rng_state(rng)
    held = HeldBackground(monkeypatch)
    checkpointer = Checkpointer(tmp_path / "async", SINGLE, sharded=False, keep=1, asynchronous=True)
    checkpointer.save(1, model, optimizer, {"at": 1})
    train_step(model, optimizer)  # training goes on before the background thread has written anything
    assert held.started == 1 and checkpointer.latest() is None
    held.release()
    checkpointer.wait()
    assert checkpointer.latest().name == "step_00000001"
    sync, asynchronous = (saved_files(tmp_path / run / "checkpoints" / "step_00000001", tmp_path)
                          for run in ("sync", "async"))
    assert any(key.endswith(".__int_data") for key in sync["dcp"]["model"])
    assert_equal(sync, asynchronous)
    assert (sorted(p.name for p in (tmp_path / "sync" / "checkpoints" / "step_00000001").iterdir())
            == sorted(p.name for p in (tmp_path / "async" / "checkpoints" / "step_00000001").iterdir()))


def test_one_save_is_in_flight_at_a_time(tmp_path, monkeypatch):
    model, optimizer = trained()
    held = HeldBackground(monkeypatch)
    checkpointer = Checkpointer(tmp_path, SINGLE, sharded=False, keep=1, asynchronous=True)
    checkpointer.save(1, model, optimizer, {})
    second = threading.Thread(target=checkpointer.save, args=(2, model, optimizer, {}))
    second.start()
    time.sleep(0.5)
    assert held.started == 1  # the second save waits for the first
    held.release()
    second.join(timeout=60)
    checkpointer.wait()
    assert checkpointer.latest().name == "step_00000002"
    assert sorted(p.name for p in checkpointer.dir.iterdir()) == ["latest", "step_00000002"]


def test_a_failed_asynchronous_save_keeps_the_previous_checkpoint_and_stops_the_run_in_one_line(tmp_path,
                                                                                             monkeypatch):
    original, writes = FileSystemWriter.write_data, []

    def write_data(writer, *args, **kwargs):
        writes.append(writer)
        if len(writes) == 2:
            raise RuntimeError("the storage went away")
        return original(writer, *args, **kwargs)
    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    cfg = config(tmp_path, n_steps=15, ckpt_interval=5, async_checkpoint=True)
    with pytest.raises(CheckpointError, match=r"could not save checkpoint step_00000010 in .*: RuntimeError: the "
                                              r"storage went away; the previous checkpoint \(step_00000005\) is "
                                              r"kept") as error:
        train(model=model, optimizer=torch.optim.AdamW(model.parameters()), batches=RegressionBatches(),
              loss_fn=mse, cfg=cfg, dist_info=SINGLE, tokens_per_step=16)
    assert "\n" not in str(error.value)
    checkpointer = Checkpointer(tmp_path, SINGLE, sharded=False, keep=1)
    assert checkpointer.latest().name == "step_00000005"
    assert sorted(p.name for p in checkpointer.dir.iterdir()) == ["latest", "step_00000005"]
