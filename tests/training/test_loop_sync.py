"""The loop reads the device only at sync points (log steps, evaluations, checkpoints, the last step), and still
never lets a non-finite step touch the weights nor saves a run that has blown up."""

import math

import pytest
import torch
from test_loop import SINGLE, RegressionBatches, config, mse
from torch import nn

import qt
from qt.training import optimizer as optimizer_module
from qt.training.checkpoint import Checkpointer
from qt.training.config import TrainConfig
from qt.training.loop import PROFILED_STEPS, StepProfiler, TrainingDiverged, train
from qt.training.optimizer import build_optimizer

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def count_host_reads(monkeypatch) -> list:
    """Every read of a tensor's value by the host (each one a sync on a GPU) from now on."""
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: reads.append("synchronize"))
    return reads


def regression(tmp_path, optimizer_class, loss_fn=mse, **overrides):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = optimizer_class(model.parameters())
    cfg = config(tmp_path, **{"log_interval": 10, "eval_interval": 0, "save_checkpoints": False, **overrides})
    return model, optimizer, lambda: train(model=model, optimizer=optimizer, batches=RegressionBatches(),
                                           loss_fn=loss_fn, cfg=cfg, dist_info=SINGLE, tokens_per_step=16)


def fused_adamw(params):
    return torch.optim.AdamW(params, lr=0.05, fused=True)


def test_with_a_fused_optimizer_the_host_reads_the_device_once_per_log_step(tmp_path, monkeypatch):
    _, _, run = regression(tmp_path, fused_adamw, n_steps=40)
    reads = count_host_reads(monkeypatch)
    run()
    assert len(reads) == 1 + 4  # the forward SQNR before step 1, then steps 10, 20, 30, 40: one transfer each


def test_other_optimizers_add_one_read_a_step(tmp_path, monkeypatch):
    _, _, run = regression(tmp_path, lambda params: torch.optim.SGD(params, lr=0.01), n_steps=40)
    reads = count_host_reads(monkeypatch)
    run()
    assert len(reads) == 1 + 40 + 4


def explodes_at(step):
    """A loss function that is NaN at call `step` and records the weights each call sees."""
    seen_weights = []

    def loss_fn(model, batch):
        seen_weights.append(model.weight.detach().clone())
        loss = mse(model, batch)
        return loss * math.nan if len(seen_weights) == step else loss
    return loss_fn, seen_weights


@pytest.mark.parametrize("optimizer_class", [fused_adamw, lambda params: torch.optim.AdamW(params, lr=0.05)],
                         ids=["fused, skipped on the device", "foreach, checked on the host"])
def test_a_nan_loss_never_touches_the_weights_and_the_run_names_the_last_good_checkpoint(tmp_path, optimizer_class):
    loss_fn, seen_weights = explodes_at(7)
    model, optimizer, run = regression(tmp_path, optimizer_class, loss_fn=loss_fn, n_steps=40, save_checkpoints=True,
                                       ckpt_interval=5)
    with pytest.raises(TrainingDiverged, match=r"loss nan \(gradient norm nan\) at step 7; stopped before updating "
                                               r"the weights\. Last good checkpoint: .*step_00000005"):
        run()
    assert torch.equal(model.weight, seen_weights[6])  # the weights after step 6: steps 7 to 10 changed nothing
    assert all(state["step"] == 6 for state in optimizer.state.values())
    assert Checkpointer(tmp_path, SINGLE, sharded=False, keep=1).latest().name == "step_00000005"


def blows_up(from_step, to_step=math.inf):
    """The regression loss, with the loss of a run that has lost everything it learned (far above the start)
    from call `from_step` to `to_step`: the weights are untouched, only the loss says so."""
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        return mse(model, batch) + (20.0 if from_step <= len(calls) <= to_step else 0.0)
    return loss_fn


def blow_up_run(tmp_path, loss_fn):
    _, _, run = regression(tmp_path, lambda params: torch.optim.AdamW(params, lr=0.05), loss_fn=loss_fn, n_steps=60,
                           save_checkpoints=True, ckpt_interval=10, keep_checkpoints=10)
    return run


def checkpoint_steps(tmp_path):
    return [int(p.name[5:]) for p in Checkpointer(tmp_path, SINGLE, sharded=False, keep=1).complete()]


@pytest.mark.parametrize("from_step, streak, stopped_at", [(43, 8, 50), (48, 5, 52)])
def test_a_run_that_has_blown_up_stops_before_saving_it(tmp_path, from_step, streak, stopped_at):
    """From 43: the streak is 8 at the step-50 checkpoint. From 48: it is 3 there, the checkpoint waits, and the
    run stops at step 52 when the streak reaches 5."""
    with pytest.raises(TrainingDiverged, match=f"for the last {streak} steps \\(step {stopped_at}\\).* the run has "
                                               f"blown up. Last good checkpoint: .*step_00000040"):
        blow_up_run(tmp_path, blows_up(from_step))()
    assert checkpoint_steps(tmp_path) == [10, 20, 30, 40]


def test_a_short_spike_delays_a_checkpoint_and_the_run_goes_on(tmp_path):
    blow_up_run(tmp_path, blows_up(49, 50))()
    assert checkpoint_steps(tmp_path) == [10, 20, 30, 40, 51, 60]


def test_a_healthy_noisy_run_is_never_taken_for_blown_up(tmp_path):
    """Batches of 2: the loss of one step swings by a factor of ten around its average."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)

    def small_batch_loss(model, batch):
        return mse(model, (batch[0][:2], batch[1][:2]))
    train(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01), batches=RegressionBatches(),
          loss_fn=small_batch_loss, cfg=config(tmp_path, n_steps=2000, log_interval=100, save_checkpoints=False),
          dist_info=SINGLE, tokens_per_step=2)


def test_the_builder_picks_fused_adamw_where_every_weight_takes_it(monkeypatch):
    monkeypatch.setattr(optimizer_module, "FUSED_BY_DEFAULT_ON", ("cpu",))
    cfg = TrainConfig()
    assert build_optimizer(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), cfg).defaults["fused"] is True
    assert build_optimizer(nn.Linear(8, 8), TrainConfig(optim_kwargs={"fused": False})).defaults["fused"] is False
    assert build_optimizer(nn.Linear(8, 8), TrainConfig(optim_kwargs={"foreach": True})).defaults["fused"] is None
    assert build_optimizer(nn.Linear(8, 8), TrainConfig(optim="SGD")).defaults["fused"] is None
    for recipe in sorted(qt.RECIPES):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
        qt.quantize_(model, recipe)
        optimizer = build_optimizer(model, cfg)
        takes_fused = optimizer_module._fused_step_skips(model[0].weight)
        assert optimizer.defaults["fused"] is (True if takes_fused else None), recipe
        model(torch.randn(2, 64)).sum().backward()
        optimizer.step()  # whatever was picked steps


def test_the_builder_leaves_the_cpu_default_alone():
    assert build_optimizer(nn.Linear(8, 8), TrainConfig()).defaults["fused"] is None


def test_a_fused_step_that_ignores_found_inf_is_not_picked(monkeypatch):
    weight = nn.Parameter(torch.zeros(4, 4))
    assert optimizer_module._fused_step_skips(weight)
    fused_adamw = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *args, found_inf=None, **kwargs: fused_adamw(*args, **kwargs))
    assert not optimizer_module._fused_step_skips(weight)


def test_profiled_steps_end_with_the_gpus_work_done_and_later_steps_do_not(monkeypatch):
    """--profile: each step until the profiler's schedule is over synchronizes the GPU first, so the recorded window
    holds exactly its steps' kernels; the steps after it keep running ahead of the GPU."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize"))

    class RecordingProfiler:
        def step(self):
            events.append("step")

    profiler = StepProfiler(RecordingProfiler(), torch.device("cuda"))
    profiled = sum(PROFILED_STEPS.values())
    for _ in range(profiled + 4):
        profiler.step()
    assert events == ["synchronize", "step"] * profiled + ["step"] * 4
    events.clear()
    cpu_profiler = StepProfiler(RecordingProfiler(), torch.device("cpu"))
    cpu_profiler.step()
    assert events == ["step"]
