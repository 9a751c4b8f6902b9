"""Host time of FSDP2's per-weight work before each all-gather, per recipe.

    python scripts/bench_fsdp_hooks.py                               # every recipe and BF16
    python scripts/bench_fsdp_hooks.py --recipes bf16 fp8_mixed_precision --iters 200

On several GPUs a faster recipe leaves less GPU work to hide FSDP2's hooks behind: they run in Python on the host,
between the compiled blocks' launches (docs/scaling.md, round 14). Before each all-gather, FSDP2 asks every weight
of the unit for its all-gather inputs (`FSDPParam.all_gather_inputs`): for a plain weight, its shard in the
param dtype; for a recipe's weight, through the weight's `fsdp_pre_all_gather` hook. This times that step
alone, for every weight of a model of --blocks blocks of the seven linears of a Llama block (q, k, v, o, gate,
up, down), --width wide, wrapped per block by `fully_shard` with BF16 all-gathers as the training loop wraps it:
one CPU process, so nothing is sent (the Python is the same as beside a GPU). The time is the host's: the median
over --repeats of the mean us a weight.
It reads FSDP2's private per-parameter state (`_get_fsdp_state()`), which torch may rename. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing qt
import qt  # noqa: E402

BASELINE = "bf16"
LINEARS_PER_BLOCK = 7


def model_of_blocks(blocks: int, width: int, recipe: str, device: torch.device) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    parts = [nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(LINEARS_PER_BLOCK)])
             for _ in range(blocks)]
    model = nn.Sequential(*parts).to(device=device, dtype=torch.bfloat16)
    if recipe != BASELINE:
        qt.quantize_(model, recipe, min_shape=None)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for part in parts:
        fully_shard(part, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model, parts


def host_us_per_weight(recipe: str, args, device: torch.device) -> float:
    model, blocks = model_of_blocks(args.blocks, args.width, recipe, device)
    model._get_fsdp_state()._lazy_init()  # what the first forward does, without the forward: FSDP2 on one process
    # takes a shortcut there that gathers only the first of a weight's all-gather inputs (INT8 rows, not their scales)
    weights = [p for block in blocks for p in block._get_fsdp_state()._fsdp_param_group.fsdp_params]
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.iters):
            for weight in weights:
                weight.all_gather_inputs
        times.append((time.perf_counter() - start) / args.iters / len(weights) * 1e6)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=[BASELINE, *qt.RECIPES],
                        help=f"'{BASELINE}' (plain weights) and recipe names")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--iters", type=int, default=50, help="passes over the weights a repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    unknown = [r for r in args.recipes if r != BASELINE and r not in qt.RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}: use '{BASELINE}' or one of {', '.join(qt.RECIPES)}")
    if min(args.blocks, args.width, args.iters, args.repeats) < 1:
        parser.error("--blocks, --width, --iters and --repeats must be at least 1")
    device = torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        rows = [(recipe, host_us_per_weight(recipe, args, device)) for recipe in args.recipes]
    finally:
        dist.destroy_process_group()
    print(f"FSDP2's all-gather inputs, host us a weight ({LINEARS_PER_BLOCK * args.blocks} weights {args.width} "
          f"wide, torch {torch.__version__}):\n")
    print("| recipe | host us a weight |\n| --- | ---: |")
    for recipe, us in rows:
        print(f"| {recipe} | {us:.1f} |")


if __name__ == "__main__":
    main()
