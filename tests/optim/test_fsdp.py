"""FSDP2 (DTensor parameters and states) on CPU with gloo, 2 processes, against one process."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import qt.optim
from tests.rendezvous import end_worker, rendezvous_file

WORLD_SIZE = 2
OPTIMIZERS = ["AdamW", "AdamW8bit", "AdamW4bit", "AdamWFp8"]
STEPS_BEFORE_SAVE = 3
STEPS_AFTER_SAVE = 2


def _make_model() -> nn.Module:
    torch.manual_seed(0)
    # (256, 256) and (33, 256) weights get quantized states; 33 rows shard unevenly (17 + 16).
    # The (256, 33) weight and the biases keep FP32 states.
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 33), nn.ReLU(), nn.Linear(33, 256))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 256, generator=generator), torch.randn(8, 256, generator=generator)) for _ in range(steps)]


def _train(model, optimizer, batches, rank: int = 0, world_size: int = 1) -> list[float]:
    """Losses of the full batch; each rank computes its slice, FSDP averages the gradients."""
    losses = []
    for x, y in batches:
        rows = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
        loss = (model(x[rows]) - y[rows]).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if world_size > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())
    return losses


def _fsdp_model_and_optimizer(optimizer_name: str):
    from torch.distributed.fsdp import fully_shard

    model = _make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, getattr(qt.optim, optimizer_name)(model.parameters(), lr=1e-2)


def _worker(rank: int, init_method: str, checkpoint_root: str, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    batches = _batches(STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE)
    for name in OPTIMIZERS:
        model, optimizer = _fsdp_model_and_optimizer(name)
        losses = _train(model, optimizer, batches[:STEPS_BEFORE_SAVE], rank, WORLD_SIZE)
        checkpoint = os.path.join(checkpoint_root, name)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=checkpoint)
        losses += _train(model, optimizer, batches[STEPS_BEFORE_SAVE:], rank, WORLD_SIZE)

        resumed_model, resumed_optimizer = _fsdp_model_and_optimizer(name)
        state = {"model": get_model_state_dict(resumed_model), "optim": get_optimizer_state_dict(resumed_model, resumed_optimizer)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(resumed_model, state["model"])
        set_optimizer_state_dict(resumed_model, resumed_optimizer, state["optim"])
        resumed_losses = _train(resumed_model, resumed_optimizer, batches[STEPS_BEFORE_SAVE:], rank, WORLD_SIZE)
        if rank == 0:
            exp_avg = optimizer.state[model[0].weight]["exp_avg"]
            layout = (type(exp_avg).__name__, exp_avg.to_local().dtype, tuple(exp_avg.to_local().shape))
            results[name] = (losses, resumed_losses, layout)
    end_worker()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    checkpoint_root = str(tmp_path_factory.mktemp("fsdp_checkpoints"))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(rendezvous_file(tmp_path_factory.mktemp("rendezvous")), checkpoint_root, results),
                 nprocs=WORLD_SIZE)
        return dict(results), checkpoint_root


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_losses_match_one_process(fsdp_results, name):
    results, _ = fsdp_results
    losses, _, (state_type, state_dtype, state_local_shape) = results[name]
    model = _make_model()
    optimizer = getattr(qt.optim, name)(model.parameters(), lr=1e-2)
    reference = _train(model, optimizer, _batches(STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE))
    reference_state = optimizer.state[model[0].weight]["exp_avg"]
    assert (state_type, state_dtype) == ("DTensor", reference_state.dtype)
    assert state_local_shape == (reference_state.shape[0] // WORLD_SIZE, *reference_state.shape[1:])
    # Same blocks on every rank as in one process; the only difference is the order in which
    # gradients are summed (float rounding, ~1e-7), which can flip a code at a rounding boundary.
    torch.testing.assert_close(losses, reference, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_sharded_checkpoint_resumes_exactly(fsdp_results, name):
    results, _ = fsdp_results
    losses, resumed_losses, _ = results[name]
    assert resumed_losses == losses[STEPS_BEFORE_SAVE:]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_checkpoint_loads_in_one_process(fsdp_results, name):
    """The 2-rank checkpoint reshards to one process: states are split by rows, like the weights."""
    results, checkpoint_root = fsdp_results
    losses, _, _ = results[name]
    model = _make_model()
    optimizer = getattr(qt.optim, name)(model.parameters(), lr=1e-2)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=os.path.join(checkpoint_root, name))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    resumed = _train(model, optimizer, _batches(STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE)[STEPS_BEFORE_SAVE:])
    torch.testing.assert_close(resumed, losses[STEPS_BEFORE_SAVE:], rtol=1e-4, atol=0)
