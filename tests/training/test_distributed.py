"""Two CPU processes (gloo): under torchrun, FSDP2 and DDP train on the same data as one process does, and an
FSDP2 run resumes bit-exactly from its sharded checkpoint; FSDP2's explicit prefetching (--fsdp_prefetch), blocks
grouped into units (--fsdp_unit_blocks) and the last unit kept gathered after the forward, like every block with
--no-fsdp_reshard_after_forward, change no number."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, pretrain_args, read_metrics
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import llm_pretrain
import qt
from qt.training.config import TrainConfig
from qt.training.distributed import Dist, fsdp_prefetch_units
from qt.training.models import decoder_blocks
from qt.training.optimizer import build_optimizer, parallelize_with_optimizer
from tests.rendezvous import end_worker, rendezvous_file
from tests.test_training_parity import markov_batches
from tests.tiny_models import tiny_llama

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


# The baseline, and a recipe whose weights all-gather in INT8 from gather inputs prepare_all_gathers stores per step.
PREFETCH_RECIPES = {"fp32": None, "int8_mixed_precision int8_all_gather": {"int8_all_gather": True}}
# How the model is wrapped: as parallelize did before --fsdp_prefetch (every block resharded after its forward),
# and through the run config.
PREFETCH_SETTINGS = {"before": None, "a block a unit, prefetch 0": {"fsdp_unit_blocks": 1, "fsdp_prefetch": 0},
                     "a block a unit, prefetch 2": {"fsdp_unit_blocks": 1},
                     "a block a unit, prefetch 2, activation checkpointing": {"fsdp_unit_blocks": 1,
                                                                              "activation_checkpointing": True},
                     "kept gathered from forward to backward": {"fsdp_unit_blocks": 1,
                                                                "fsdp_reshard_after_forward": False},
                     "the defaults (units of 2 blocks, prefetch 2)": {}}
BLOCKS = 4


def wrapped(recipe_options, settings, dist_info):
    """(model, its blocks, optimizer): a 4-block tiny Llama, quantized or not, sharded as `settings` say."""
    model = tiny_llama(num_hidden_layers=BLOCKS)
    if recipe_options is not None:
        qt.quantize_(model, "int8_mixed_precision", **recipe_options)
    blocks = decoder_blocks(model)
    if settings is None:
        policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model, blocks, build_optimizer(model, TrainConfig(lr=3e-3))
    model, optimizer = parallelize_with_optimizer(model, blocks, TrainConfig(lr=3e-3, **settings), dist_info,
                                                  torch.float32)
    return model, blocks, optimizer


def train_and_evaluate(model, blocks, optimizer, rank):
    """As the training loop does: 4 steps, each followed by prepare_all_gathers and a validation forward without
    gradients (after which a block kept gathered must still hold the current weights). This rank's (training loss,
    validation loss) per step, and which blocks hold gathered weights at the end of the first forward."""
    torch.manual_seed(1)  # the same stochastic rounding draws for every wrapping
    batches = markov_batches(5, batch=8, seed=1)
    validation = next(batches).chunk(2)[rank]
    qt.prepare_all_gathers(model)
    losses, gathered = [], None
    for tokens in batches:
        shard = tokens.chunk(2)[rank]
        loss = model(input_ids=shard, labels=shard).loss
        if gathered is None:
            gathered = [not isinstance(block.mlp.up_proj.weight, DTensor) for block in blocks]
        loss.backward()
        optimizer.step()
        qt.prepare_all_gathers(model)
        optimizer.zero_grad()
        with torch.no_grad():
            losses.append((loss.item(), model(input_ids=validation, labels=validation).loss.item()))
    return losses, gathered


def prefetched(module, blocks):
    """The indices of the blocks `module` prefetches in the forward and in the backward. FSDP2 has no public getter:
    this reads what FSDPModule.set_modules_to_forward_prefetch / _backward_prefetch stored."""
    states = [block._get_fsdp_state() for block in blocks]
    state = module._get_fsdp_state()
    return ([states.index(s) for s in state._states_to_forward_prefetch],
            [states.index(s) for s in state._states_to_backward_prefetch])


def prefetch_worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    dist_info = Dist(rank, 2, torch.device("cpu"))
    results = {}
    for recipe, options in PREFETCH_RECIPES.items():
        for setting, settings in PREFETCH_SETTINGS.items():
            model, blocks, optimizer = wrapped(options, settings, dist_info)
            losses, gathered = train_and_evaluate(model, blocks, optimizer, rank)
            results[f"{recipe}, {setting}"] = {"losses": losses, "gathered after forward": gathered}
            if setting == "a block a unit, prefetch 2" and options is None:
                results["lists"] = {"root": prefetched(model, blocks),
                                    "blocks": [prefetched(block, blocks) for block in blocks]}
            if setting == "the defaults (units of 2 blocks, prefetch 2)" and options is None:
                units = blocks[::2]
                results["unit lists"] = {"root": prefetched(model, units),
                                         "units": [prefetched(block, units) for block in blocks]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    end_worker()


@pytest.fixture(scope="module")
def prefetch_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("prefetch"))
    mp.spawn(prefetch_worker, args=(rendezvous_file(out_dir), out_dir), nprocs=2, join=True)
    return [json.loads(open(os.path.join(out_dir, f"rank{rank}.json")).read()) for rank in range(2)]


@pytest.mark.parametrize("recipe", PREFETCH_RECIPES)
def test_prefetching_and_blocks_kept_gathered_change_no_loss(recipe, prefetch_results):
    for results in prefetch_results:
        before = results[f"{recipe}, before"]
        assert before["gathered after forward"] == [False] * BLOCKS
        assert before["losses"][-1][1] < before["losses"][0][1] - 0.1  # the weights change: a stale gather would show
        for setting in PREFETCH_SETTINGS:
            run = results[f"{recipe}, {setting}"]
            # Bit for bit: prefetching only moves all-gathers earlier, and the kept block holds what a
            # re-gather would give (the INT8 gather reuses the step's gather inputs).
            assert run["losses"] == before["losses"], setting
            if setting == "kept gathered from forward to backward":
                assert run["gathered after forward"] == [True] * BLOCKS
            elif setting == "the defaults (units of 2 blocks, prefetch 2)":  # the last unit, both its blocks
                assert run["gathered after forward"] == [False, False, True, True]
            elif setting != "before":
                assert run["gathered after forward"] == [False] * (BLOCKS - 1) + [True], setting


@pytest.mark.parametrize(("flags", "units"), [({}, 2), ({"quantize": "int8_mixed_precision"}, 2),
                                              ({"quantize": "int8_mixed_precision", "fsdp_prefetch": 3}, 3),
                                              ({"fsdp_prefetch": 0}, 0), ({"fsdp_prefetch": None}, 2)])
def test_prefetch_depth_is_the_flag_or_the_measured_default(flags, units):
    assert fsdp_prefetch_units(TrainConfig(**flags)) == units


def test_each_unit_prefetches_the_next_and_previous_units_asked_for(prefetch_results):
    for results in prefetch_results:
        # --fsdp_prefetch 2 on 4 blocks: block i prefetches i+1, i+2 in the forward and i-1, i-2 in the backward
        # (as far as there are blocks); the root, which runs before block 0 and is differentiated before block 3,
        # prefetches the first two and the last two.
        assert results["lists"]["blocks"] == [[[1, 2], []], [[2, 3], [0]], [[3], [1, 0]], [[], [2, 1]]]
        assert results["lists"]["root"] == [[0, 1], [3, 2]]
        # The defaults: two units, blocks 0-1 and 2-3, whose blocks share the unit's state; each prefetches the
        # other where it can, the root both.
        assert results["unit lists"]["units"] == [[[1], []], [[1], []], [[], [0]], [[], [0]]]
        assert results["unit lists"]["root"] == [[0, 1], [1, 0]]


def clipping_worker(rank, init_method, out_dir):
    """Each rank: FSDP2's sharded gradients clipped by the loop's clip_gradients and by torch's clip_grad_norm_,
    from the same gradients; their norms and this rank's clipped shards."""
    from qt.training.loop import clip_gradients
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    results = {}
    for recipe_options in (None, {}):
        model, _, optimizer = wrapped(recipe_options, None, Dist(rank, 2, torch.device("cpu")))
        tokens = next(markov_batches(1, batch=8, seed=2)).chunk(2)[rank]
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads = [p.grad for p in model.parameters()]
        originals = [grad._local_tensor.clone() for grad in grads]
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05).full_tensor()
        expected = [grad._local_tensor.clone() for grad in grads]
        for grad, original in zip(grads, originals):
            grad._local_tensor.copy_(original)
        clip_grad_norm = torch.nn.utils.clip_grad_norm_
        torch.nn.utils.clip_grad_norm_ = None  # the sharded path must not fall back to it
        try:
            ours = clip_gradients(model, optimizer, 0.05)
        finally:
            torch.nn.utils.clip_grad_norm_ = clip_grad_norm
        results["bf16" if recipe_options is None else "int8_mixed_precision"] = {
            "norms": [norm.item(), ours.item()], "plain": type(ours) is torch.Tensor,
            "max shard error": max((a - b).abs().max().item() / b.abs().max().item()
                                   for a, b in zip((g._local_tensor for g in grads), expected) if b.numel())}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    end_worker()


def test_sharded_gradients_are_clipped_as_torch_clips_them(tmp_path):
    mp.spawn(clipping_worker, args=(rendezvous_file(tmp_path), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for results in ranks:
        for recipe, result in results.items():
            torch_norm, ours = result["norms"]
            assert torch_norm > 0.5, recipe  # far above 0.05: the gradients are scaled down
            assert ours == pytest.approx(torch_norm, rel=1e-6), recipe
            assert result["plain"] and result["max shard error"] < 1e-6, recipe
    assert ranks[0]["bf16"]["norms"] == ranks[1]["bf16"]["norms"]


def test_compile_gives_the_blocks_with_quantized_linears_qt_inductor_options(monkeypatch):
    """parallelize compiles each block with qt.inductor_options(block): those holding a quantized linear with the
    multi-kernel reductions that a quantization fused into its input's producer needs, the others with Inductor's
    defaults."""
    from qt.training.distributed import parallelize

    compiled = {}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.update({id(self): kwargs}))
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    qt.quantize_(model[0], "int8_mixed_precision", filter_fn=lambda module, name: True)
    parallelize(model, list(model), Dist(0, 1, torch.device("cpu")), compute_dtype=torch.float32,
                activation_checkpointing=False, compile=True, ddp=False)
    assert compiled == {id(model[0]): {"options": {"triton.multi_kernel": 1}}, id(model[1]): {"options": {}}}


@pytest.mark.parametrize(("ending", "destroys"), [(None, True), (RuntimeError("rank 1 failed"), False),
                                                   (SystemExit(3), True)])
def test_the_process_group_is_destroyed_after_a_run_and_left_to_torchrun_after_an_error(monkeypatch, ending, destroys):
    """On an error, destroying an NCCL group would wait for collectives the other ranks are blocked in: the error is
    raised with the group left as it is (the process exits, torchrun stops the others). A run that returns, or that
    every rank leaves together as a stopped run (SystemExit), destroys it."""
    from qt.training import distributed

    destroyed = []
    monkeypatch.setattr(distributed, "init_distributed", lambda: Dist(1, 2, torch.device("cpu")))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: destroyed.append(True))
    with pytest.raises(type(ending)) if ending else contextlib.nullcontext():
        with distributed.distributed_processes() as dist_info:
            assert dist_info.rank == 1
            if ending:
                raise ending
    assert destroyed == ([True] if destroys else [])
