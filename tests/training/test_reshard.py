"""A checkpoint resumes on another number of processes: saved on one process and loaded on 2 (FSDP2), saved on 2
and loaded on 1 (no FSDP) and on 3 (uneven shards). For every recipe and every qt.optim Adam (FP32, 8-bit,
4-bit, FP8 states) and torch's AdamW, the states after loading equal the saved ones exactly: the model's (the
inner tensors of each quantized weight: INT8 data and row scales, master or latent weights) and the optimizer's;
also those saved in the background (--async_checkpoint) while training went on.
Checkpoints of earlier qt versions (per-process files) load with their own number of processes, and are refused
in one line with another."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

import qt
from qt.training.checkpoint import Checkpointer, _flatten_subclasses
from qt.training.config import ConfigError
from qt.training.distributed import Dist
from tests.rendezvous import end_worker, rendezvous_file

RECIPES = [None, *sorted(qt.RECIPES)]
OPTIMIZERS = ["torch.AdamW", *(name for name in qt.optim.__all__ if name.startswith("Adam"))]
LEGACY = Path(__file__).parent / "data" / "legacy_checkpoints"


def trained(recipe, optimizer_name, dist_info: Dist, seed=0):
    """Two linears whose weights shard unevenly on 3 processes (40 rows: 14 + 14 + 12; 256 rows: 86 + 86 + 84);
    the first has the 256-wide rows that the low-bit optimizers quantize. After two steps (seed 0), or fresh."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 40), nn.Linear(40, 256))
    if recipe:
        qt.quantize_(model, recipe)
    if dist_info.world_size > 1:
        from torch.distributed.fsdp import fully_shard
        for linear in model:
            fully_shard(linear)
        fully_shard(model)
    optimizer_class = torch.optim.AdamW if optimizer_name == "torch.AdamW" else getattr(qt.optim, optimizer_name)
    optimizer = optimizer_class(model.parameters(), lr=1e-2)
    for _ in range(2 if seed == 0 else 0):
        train_step(model, optimizer)
    return model, optimizer


def train_step(model, optimizer):
    model(torch.randn(4, 256)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def whole(value: DTensor) -> torch.Tensor:
    if value.dtype.itemsize != 1:
        return value.full_tensor()
    # gloo gathers no FP8: the bytes instead
    as_bytes = DTensor.from_local(value.to_local().view(torch.uint8), value.device_mesh, value.placements,
                                  shape=value.shape, stride=value.stride())
    return as_bytes.full_tensor().view(value.dtype)


def full_state(model, optimizer) -> dict:
    """Every tensor and value of the model's and optimizer's states, whole, by a flat key (copies)."""
    flat = {}

    def add(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                add(f"{prefix}.{i}", v)
        elif isinstance(value, DTensor):
            flat[prefix] = whole(value)
        else:
            flat[prefix] = value.clone() if isinstance(value, torch.Tensor) else value
    add("model", _flatten_subclasses(get_model_state_dict(model)))
    add("optimizer", get_optimizer_state_dict(model, optimizer))
    return flat


def mismatches(expected: dict, got: dict) -> list[str]:
    wrong = sorted(expected.keys() ^ got.keys())
    for key in expected.keys() & got.keys():
        a, b = expected[key], got[key]
        same = (a.dtype == b.dtype and torch.equal(a, b)) if isinstance(a, torch.Tensor) else a == b
        if not same:
            wrong.append(key)
    return wrong


def combinations():
    """Each optimizer once, each recipe at least twice: a recipe decides the model's state, an optimizer its own."""
    return [(RECIPES[i % len(RECIPES)], name) for i, name in enumerate(OPTIMIZERS)]


def save_all(root: Path, dist_info: Dist) -> None:
    """Every combination trained and saved under root/RECIPE-OPTIMIZER, every other one in the background while
    training goes on; the states saved, whole, beside (rank 0)."""
    for i, (recipe, name) in enumerate(combinations()):
        model, optimizer = trained(recipe, name, dist_info)
        expected = full_state(model, optimizer)
        run_dir = root / f"{recipe}-{name}"
        checkpointer = Checkpointer(run_dir, dist_info, sharded=dist_info.world_size > 1, keep=1,
                                    asynchronous=i % 2 == 1)
        checkpointer.save(2, model, optimizer, {"combination": [recipe, name]})
        if checkpointer.asynchronous:
            train_step(model, optimizer)
        checkpointer.wait()
        if dist_info.is_main:
            torch.save(expected, run_dir / "expected_state.pt")


def load_all(root: Path, dist_info: Dist) -> dict[str, list[str]]:
    """Load every combination saved under `root` into fresh models; the keys whose values differ, by combination."""
    wrong = {}
    for recipe, name in combinations():
        model, optimizer = trained(recipe, name, dist_info, seed=1)
        run_dir = root / f"{recipe}-{name}"
        restored = Checkpointer(run_dir, dist_info, sharded=dist_info.world_size > 1, keep=1).load(model, optimizer)
        assert (restored.step, restored.extra) == (2, {"combination": [recipe, name]})
        got = full_state(model, optimizer)
        wrong[f"{recipe}-{name}"] = mismatches(torch.load(run_dir / "expected_state.pt", weights_only=False), got)
    return wrong


def legacy_fsdp2_mismatches(tmp_path: Path, dist_info: Dist) -> list[str]:
    """Load the per-process checkpoint an earlier qt wrote on 2 processes (FSDP2, AdamW8bit): the keys whose
    values differ from what it held."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(256, 20), nn.Linear(20, 256))
    for linear in model:
        fully_shard(linear)
    fully_shard(model)
    optimizer = qt.optim.AdamW8bit(model.parameters(), lr=1e-3)
    restored = Checkpointer(tmp_path, dist_info, sharded=True, keep=1).load(model, optimizer)
    assert (restored.step, restored.extra) == (2, {"note": "legacy"})
    expected = torch.load(tmp_path / "expected_state.pt", weights_only=False)
    got_model = {k: whole(v) for k, v in model.state_dict().items()}
    got_optimizer = {f"{i}.{k}": whole(v) if isinstance(v, DTensor) else v
                     for i, state in optimizer.state_dict()["state"].items() for k, v in state.items()}
    return mismatches(expected["model"], got_model) + mismatches(expected["optimizer"], got_optimizer)


def worker(rank, world_size, init_method, root, job):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    dist_info = Dist(rank, world_size, torch.device("cpu"))
    root = Path(root)
    if job == "load one, save two":
        report = {"one -> two": load_all(root / "one", dist_info),
                  "legacy": legacy_fsdp2_mismatches(root / "legacy_fsdp2", dist_info)}
        save_all(root / "two", dist_info)
    else:
        report = {"two -> three": load_all(root / "two", dist_info)}
    (root / f"{job} rank {rank}.json").write_text(json.dumps(report))
    end_worker()


def spawn(root: Path, world_size: int, job: str) -> list[dict]:
    mp.spawn(worker, args=(world_size, rendezvous_file(root), str(root), job), nprocs=world_size, join=True)
    return [json.loads((root / f"{job} rank {rank}.json").read_text()) for rank in range(world_size)]


SINGLE = Dist(0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints saved on one process (ROOT/one) and on two (ROOT/two); the two processes also loaded ROOT/one
    and an earlier qt's checkpoint of 2 processes, and `reports` says what they found."""
    root = tmp_path_factory.mktemp("reshard")
    save_all(root / "one", SINGLE)
    shutil.copytree(LEGACY / "fsdp2_two_processes", root / "legacy_fsdp2")
    return SimpleNamespace(root=root, reports=spawn(root, 2, "load one, save two"))


def no_mismatches(reports: dict[str, list[str]]) -> dict[str, list[str]]:
    return {combination: keys for combination, keys in reports.items() if keys}


def test_saved_on_one_process_resumes_on_two(saved):
    for report in saved.reports:
        assert len(report["one -> two"]) == len(OPTIMIZERS)
        assert no_mismatches(report["one -> two"]) == {}


def test_saved_on_two_processes_resumes_on_one(saved):
    assert no_mismatches(load_all(saved.root / "two", SINGLE)) == {}


def test_saved_on_two_processes_resumes_on_three_with_uneven_shards(saved):
    for report in spawn(saved.root, 3, "load two on three"):
        assert no_mismatches(report["two -> three"]) == {}


def test_a_checkpoint_of_an_earlier_version_loads_with_its_number_of_processes(saved):
    for report in saved.reports:
        assert report["legacy"] == []


def test_a_checkpoint_of_an_earlier_version_on_another_number_of_processes_is_refused_in_one_line(tmp_path):
    shutil.copytree(LEGACY / "fsdp2_two_processes", tmp_path, dirs_exist_ok=True)
    model = nn.Sequential(nn.Linear(256, 20), nn.Linear(20, 256))
    with pytest.raises(ConfigError, match=r"was written by 2 processes in the per-process layout of earlier qt "
                                          r"versions.*torchrun --nproc_per_node 2") as error:
        Checkpointer(tmp_path, SINGLE, sharded=False, keep=1).load(model, qt.optim.AdamW8bit(model.parameters()))
    assert "\n" not in str(error.value)


def test_a_one_process_checkpoint_of_an_earlier_version_resumes_and_its_next_one_is_reshardable(tmp_path):
    from test_loop import RegressionBatches, config, mse

    from qt.training.loop import train

    shutil.copytree(LEGACY / "one_process", tmp_path, dirs_exist_ok=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000005")
    saved = torch.load(tmp_path / "checkpoints" / "step_00000005" / "rank_0.pt", weights_only=False)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    assert Checkpointer(tmp_path, SINGLE, sharded=False, keep=1).load(model, optimizer).step == 5
    assert mismatches(saved["model"], model.state_dict()) == []
    assert mismatches(saved["optimizer"]["state"][0], optimizer.state_dict()["state"][0]) == []

    train(model=model, optimizer=optimizer, batches=RegressionBatches(), loss_fn=mse, dist_info=SINGLE,
          tokens_per_step=16, cfg=config(tmp_path, n_steps=10, ckpt_interval=5, keep_checkpoints=2, resume=True))
    assert (tmp_path / "checkpoints" / "step_00000010" / ".metadata").is_file()


class OneHeadUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x):
        return self.used(x)


def test_a_parameter_without_an_optimizer_state_has_none_after_loading(tmp_path):
    torch.manual_seed(0)
    model = OneHeadUnused()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    Checkpointer(tmp_path, SINGLE, sharded=False, keep=1).save(1, model, optimizer, {})
    fresh = OneHeadUnused()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    Checkpointer(tmp_path, SINGLE, sharded=False, keep=1).load(fresh, fresh_optimizer)
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert sorted(loaded) == sorted(saved) == [0, 1]  # used.weight, used.bias
    assert all(mismatches(saved[i], loaded[i]) == [] for i in saved)


def test_a_resume_on_another_number_of_processes_says_so_in_the_log():
    from qt.training.loop import _resharded
    assert _resharded(2, 2) == ""
    assert _resharded(8, 4).startswith("; it was written by 8 processes, loaded here on 4: the run goes on from "
                                       "the same weights, optimizer states and data position, with other random")
