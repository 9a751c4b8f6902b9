"""The training loop and checkpoints on a model that is not a language model: the loop is generic."""

import math

import pytest
import torch
from torch import nn

from qt.training.checkpoint import Checkpointer
from qt.training.config import TrainConfig
from qt.training.distributed import Dist
from qt.training.loop import TrainingDiverged, train

SINGLE = Dist(rank=0, world_size=1, device=torch.device("cpu"))


class RegressionBatches:
    def __init__(self):
        self.drawn = 0

    def __iter__(self):
        return self

    def __next__(self):
        generator = torch.Generator().manual_seed(self.drawn)
        self.drawn += 1
        x = torch.randn(16, 4, generator=generator)
        return x, x.sum(dim=1, keepdim=True)

    def state_dict(self):
        return {"drawn": self.drawn}

    def load_state_dict(self, state):
        self.drawn = state["drawn"]


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def config(tmp_path, **overrides):
    return TrainConfig(**{"run_dir": str(tmp_path), "wandb": "disabled", "log_interval": 1, "warmup_steps": 1,
                          "lr": 0.05, **overrides})


def test_a_non_language_model_trains(tmp_path):
    model = nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    last = train(model=model, optimizer=optimizer, batches=RegressionBatches(), loss_fn=mse,
                 cfg=config(tmp_path, n_steps=200), dist_info=SINGLE, tokens_per_step=16)
    assert last["loss"] < 0.01


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []

    def loss_that_explodes_at_step_7(model, batch):
        calls.append(1)
        loss = mse(model, batch)
        return loss * math.nan if len(calls) == 7 else loss

    model = nn.Linear(4, 1)
    with pytest.raises(TrainingDiverged, match=r"loss nan .* at step 7; .*step_00000006"):
        train(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), batches=RegressionBatches(),
              loss_fn=loss_that_explodes_at_step_7, cfg=config(tmp_path, n_steps=20, ckpt_interval=3),
              dist_info=SINGLE, tokens_per_step=16)
    checkpointer = Checkpointer(tmp_path, SINGLE, sharded=False, keep=1)
    assert checkpointer.latest().name == "step_00000006"
    restored = nn.Linear(4, 1)
    assert checkpointer.load(restored, torch.optim.SGD(restored.parameters(), lr=0.01)).step == 6
    assert all(torch.isfinite(p).all() for p in restored.parameters())


def test_the_run_logs_the_forward_sqnr_of_its_quantized_linear_once_in_its_first_record(tmp_path, capsys):
    import qt
    from qt.sqnr import forward_sqnr
    from qt.training.metrics import read_metrics
    model = qt.quantize_(nn.Sequential(nn.Linear(4, 32), nn.Linear(32, 1)), "int8_mixed_precision",
                         filter_fn=lambda m, name: name == "0")
    expected = forward_sqnr(model)
    assert expected.layer == "0" and expected.db < 50
    cfg = config(tmp_path, n_steps=4, ckpt_interval=2, keep_checkpoints=2)
    train(model=model, optimizer=torch.optim.AdamW(model.parameters()), batches=RegressionBatches(), loss_fn=mse,
          cfg=cfg, dist_info=SINGLE, tokens_per_step=16)
    assert f"forward SQNR of 0 vs its unquantized twin: {expected.db:.1f} dB\n" in capsys.readouterr().out
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r.get("forward_sqnr_db") for r in records] == [round(expected.db, 2), None, None, None]
    # A resumed session measures again (the log line) but leaves the run's records as they were.
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    cfg.resume = True
    train(model=model, optimizer=torch.optim.AdamW(model.parameters()), batches=RegressionBatches(), loss_fn=mse,
          cfg=cfg, dist_info=SINGLE, tokens_per_step=16)
    assert "forward SQNR of 0 vs its unquantized twin" in capsys.readouterr().out
    assert [r.get("forward_sqnr_db") for r in read_metrics(tmp_path / "metrics.jsonl")] == [records[0]["forward_sqnr_db"],
                                                                                          None, None, None]


@pytest.mark.parametrize("gc_interval", [3, 0])
def test_garbage_is_collected_every_gc_interval_steps_with_automatic_collection_off(tmp_path, gc_interval):
    import gc

    seen = []  # (steps drawn so far, automatic collection on, generation) at each collection while training
    batches = RegressionBatches()

    def loss_with_cyclic_garbage(model, batch):
        for _ in range(2000):  # enough allocations to set off an automatic collection of generation 0
            cycle = []
            cycle.append(cycle)
        return mse(model, batch)

    def record(phase, info):
        if phase == "start":
            seen.append((batches.drawn, gc.isenabled(), info["generation"]))

    model = nn.Linear(4, 1)
    gc.callbacks.append(record)
    try:
        train(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), batches=batches,
              loss_fn=loss_with_cyclic_garbage, cfg=config(tmp_path, n_steps=7, gc_interval=gc_interval,
                                                           save_checkpoints=False),
              dist_info=SINGLE, tokens_per_step=16)
    finally:
        gc.callbacks.remove(record)
    assert gc.isenabled()
    in_steps = [entry for entry in seen if entry[0] >= 1]
    if gc_interval:
        # one collection before the first step, then one after steps 3 and 6; automatic ones only once the
        # loop has turned automatic collection back on, after its last step
        assert [(drawn, generation) for drawn, enabled, generation in in_steps if not enabled] == [(3, 1), (6, 1)]
        assert all(drawn == 7 for drawn, enabled, _ in in_steps if enabled)
    else:
        assert len(in_steps) > 7 and all(enabled for _, enabled, _ in in_steps)
