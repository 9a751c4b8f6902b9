"""--resume never runs code planted in a run directory and never reads outside it; every checkpoint qt writes
(each recipe, each optimizer, FSDP2 shards) still loads under those rules."""

import hashlib
import json
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import qt
from qt.training.checkpoint import CheckpointError, Checkpointer
from qt.training.distributed import Dist
from tests.rendezvous import end_worker, rendezvous_file

SINGLE = Dist(rank=0, world_size=1, device=torch.device("cpu"))
OPTIMIZERS = {"AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD, "AdamW8bit": qt.optim.AdamW8bit,
              "AdamW4bit": qt.optim.AdamW4bit, "AdamWFp8": qt.optim.AdamWFp8}


def trained(recipe, optimizer_class, seed=0, wrap=lambda model: model):
    """A two-linear model (64 wide: the low-bit optimizers quantize states of 4096+ elements) after one step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    if recipe:
        qt.quantize_(model, recipe)
    model = wrap(model)
    optimizer = optimizer_class(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def assert_same_state(a, b):
    for (name, x), y in zip(a.items(), b.values()):
        if isinstance(x, dict):
            assert_same_state(x, y)
        elif isinstance(x, torch.Tensor):
            x, y = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (x, y))
            x, y = (t.dequantize() if isinstance(t, qt.QuantizedWeight) else t for t in (x, y))
            assert torch.equal(x, y), name


@pytest.mark.parametrize("recipe", [None, *sorted(qt.RECIPES)])
def test_every_recipe_and_optimizer_round_trips_through_the_safe_loader(recipe, tmp_path):
    for name, optimizer_class in OPTIMIZERS.items():
        model, optimizer = trained(recipe, optimizer_class)
        checkpointer = Checkpointer(tmp_path / name, SINGLE, sharded=False, keep=1)
        checkpointer.save(1, model, optimizer, {"note": name})
        fresh_model, fresh_optimizer = trained(recipe, optimizer_class, seed=1)
        restored = checkpointer.load(fresh_model, fresh_optimizer)
        assert (restored.step, restored.extra) == (1, {"note": name})
        assert_same_state(model.state_dict(), fresh_model.state_dict())
        assert_same_state(optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"])


def test_the_cpu_offloaded_optimizer_round_trips(tmp_path):
    model, optimizer = trained(None, lambda params, lr: qt.optim.CPUOffloadOptimizer(params, lr=lr))
    checkpointer = Checkpointer(tmp_path, SINGLE, sharded=False, keep=1)
    checkpointer.save(1, model, optimizer, {})
    fresh_model, fresh_optimizer = trained(None, lambda params, lr: qt.optim.CPUOffloadOptimizer(params, lr=lr), seed=1)
    checkpointer.load(fresh_model, fresh_optimizer)
    assert_same_state(model.state_dict(), fresh_model.state_dict())
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert_same_state(saved["optimizer"]["state"], loaded["optimizer"]["state"])
    assert all(torch.equal(a, b) for a, b in zip(saved["masters"], loaded["masters"], strict=True))


def fsdp_worker(rank, init_method, run_dir):
    from torch.distributed.fsdp import fully_shard

    def shard(model):
        for linear in model:
            fully_shard(linear)
        return fully_shard(model)

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    dist_info = Dist(rank=rank, world_size=2, device=torch.device("cpu"))
    for recipe in [None, *sorted(qt.RECIPES)]:
        for name in ("AdamW", "AdamW8bit"):
            model, optimizer = trained(recipe, OPTIMIZERS[name], wrap=shard)
            checkpointer = Checkpointer(f"{run_dir}/{recipe}-{name}", dist_info, sharded=True, keep=1)
            checkpointer.save(1, model, optimizer, {})
            fresh_model, fresh_optimizer = trained(recipe, OPTIMIZERS[name], seed=1, wrap=shard)
            checkpointer.load(fresh_model, fresh_optimizer)
            assert_same_state(model.state_dict(), fresh_model.state_dict())
            assert_same_state(optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"])
    end_worker()


@pytest.mark.slow  # two processes
def test_fsdp2_shards_of_every_recipe_round_trip_through_the_safe_loader(tmp_path):
    mp.spawn(fsdp_worker, args=(rendezvous_file(tmp_path), str(tmp_path)), nprocs=2, join=True)


class WritesAMarker:
    """Unpickling this (with a loader that runs code) creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def saved_run(tmp_path):
    model = nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpointer = Checkpointer(tmp_path / "run", SINGLE, sharded=False, keep=1)
    checkpointer.save(1, model, optimizer, {})
    return checkpointer, model, optimizer


def update_manifest_for(*paths):
    """What an attacker with write access to the run directory does after replacing checkpoint files: update
    their sizes and checksums in the manifest (else the files are merely damaged, and skipped)."""
    manifest_file = paths[0].parent / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for path in paths:
        manifest["files"][path.name] = {"size": path.stat().st_size,
                                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest_file.write_text(json.dumps(manifest))


def plant(path, obj, *, update_manifest=True):
    torch.save(obj, path)
    if update_manifest:
        update_manifest_for(path)


@pytest.mark.parametrize("update_manifest, error", [
    (True, "refusing to load .*rank_0.pt: it holds io.open"),
    (False, "no intact checkpoint in .*rank_0.pt has [0-9]+ bytes, not [0-9]+")])
def test_a_planted_pickle_is_refused_in_one_line_and_never_runs(saved_run, tmp_path, update_manifest, error):
    checkpointer, model, optimizer = saved_run
    marker = tmp_path / "marker"
    plant(checkpointer.dir / "step_00000001" / "rank_0.pt",
          {"step": 1, "world_size": 1, "model": WritesAMarker(marker)}, update_manifest=update_manifest)
    with pytest.raises(CheckpointError, match=error) as raised:
        checkpointer.load(model, optimizer)
    assert "\n" not in str(raised.value)
    assert not marker.exists()


def test_a_planted_dcp_metadata_is_refused_in_one_line_and_never_runs(saved_run, tmp_path):
    """DCP reads its .metadata with pickle: here only DCP's metadata classes are admitted."""
    checkpointer, model, optimizer = saved_run
    marker, metadata = tmp_path / "marker", checkpointer.dir / "step_00000001" / ".metadata"
    metadata.write_bytes(pickle.dumps(WritesAMarker(marker)))
    update_manifest_for(metadata)
    with pytest.raises(CheckpointError, match="refusing to load .*/.metadata: it holds io.open") as raised:
        checkpointer.load(model, optimizer)
    assert "\n" not in str(raised.value)
    assert not marker.exists()


class RunsCodeWhenLoaded(torch.Tensor):
    """A tensor whose pickle, once loaded by a loader that runs code, creates the file MARKER."""

    MARKER = None

    def __reduce_ex__(self, protocol):
        return open, (str(self.MARKER), "w")


@pytest.mark.parametrize("planted", ["tensor", "value"])
def test_a_planted_dcp_payload_is_refused_in_one_line_and_never_runs(saved_run, tmp_path, monkeypatch, planted):
    """The states themselves: DCP loads tensors with weights_only, and other values (optimizer settings) with
    weights_only=False, which qt overrides."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    checkpointer, model, optimizer = saved_run
    marker, step = tmp_path / "marker", checkpointer.dir / "step_00000001"
    monkeypatch.setattr(RunsCodeWhenLoaded, "MARKER", marker)
    states = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if planted == "tensor":
        states["model"]["weight"] = states["model"]["weight"].detach().as_subclass(RunsCodeWhenLoaded)
    else:
        states["optimizer"]["param_groups"][0]["eps"] = WritesAMarker(marker)
    for old in [step / ".metadata", *step.glob("*.distcp")]:
        old.unlink()
    dcp.save(states, checkpoint_id=step, no_dist=True)
    update_manifest_for(step / ".metadata", *step.glob("*.distcp"))
    with pytest.raises(CheckpointError, match=f"refusing to load {step}: it holds io.open") as raised:
        checkpointer.load(model, optimizer)
    assert "\n" not in str(raised.value)
    assert not marker.exists()


def test_dcp_metadata_naming_a_file_outside_the_checkpoint_is_refused(saved_run):
    checkpointer, model, optimizer = saved_run
    metadata_file = checkpointer.dir / "step_00000001" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())
    next(iter(metadata.storage_data.values())).relative_path = "../../../../../etc/passwd"
    metadata_file.write_bytes(pickle.dumps(metadata))
    update_manifest_for(metadata_file)
    with pytest.raises(CheckpointError, match=r"its .metadata names '../../../../../etc/passwd', which is not one of "
                                              r"its files"):
        checkpointer.load(model, optimizer)


@pytest.mark.parametrize("pointer", ["absolute", "parent"])
def test_latest_must_name_a_checkpoint_of_this_run(saved_run, tmp_path, pointer):
    checkpointer, model, optimizer = saved_run
    other = Checkpointer(tmp_path / "other", SINGLE, sharded=False, keep=1)
    other.save(7, model, optimizer, {"from": "elsewhere"})
    target = other.dir / "step_00000007"
    (checkpointer.dir / "latest").write_text(str(target) if pointer == "absolute" else "../../other/checkpoints/"
                                             "step_00000007")
    with pytest.raises(CheckpointError, match="must hold a checkpoint name like step_00000500") as error:
        checkpointer.load(model, optimizer)
    assert "\n" not in str(error.value)


def test_a_symlink_out_of_the_run_directory_is_refused(saved_run, tmp_path):
    checkpointer, model, optimizer = saved_run
    other = Checkpointer(tmp_path / "other", SINGLE, sharded=False, keep=1)
    other.save(1, model, optimizer, {"from": "elsewhere"})
    planted = checkpointer.dir / "step_00000001" / "rank_0.pt"
    planted.unlink()
    planted.symlink_to(other.dir / "step_00000001" / "rank_0.pt")
    with pytest.raises(CheckpointError, match="leads outside the run directory"):
        checkpointer.load(model, optimizer)


@pytest.mark.parametrize("planted", ["link", "not an id"])
def test_a_planted_wandb_run_id_is_refused(tmp_path, planted):
    """RUN_DIR/wandb_run_id is sent to wandb: a link out of the run directory or a file that is no id is refused."""
    from qt.training.config import ConfigError
    from qt.training.metrics import wandb_run_id

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert wandb_run_id(run_dir) == wandb_run_id(run_dir)  # written once, then read back
    (run_dir / "wandb_run_id").unlink()
    secret = tmp_path / "secret"
    secret.write_text("abc123")
    if planted == "link":
        (run_dir / "wandb_run_id").symlink_to(secret)
    else:
        (run_dir / "wandb_run_id").write_text("a b/../c")
    with pytest.raises(ConfigError, match="not a wandb run id written by this run"):
        wandb_run_id(run_dir)
