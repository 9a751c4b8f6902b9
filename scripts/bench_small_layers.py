"""Where a recipe's linear starts to beat BF16: the measurement behind qt.SMALL_LINEAR_MIN_SHAPE.

    python scripts/bench_small_layers.py --tokens 16384 --out $OUT         # one GPU, every recipe (~6-9 min)
    python scripts/bench_small_layers.py --tokens 4096 --out $OUT          # the other half
    python scripts/bench_small_layers.py --report A/bench_small_layers.json B/bench_small_layers.json --out DIR
    python scripts/bench_small_layers.py --smoke --out /tmp/small          # CPU, tiny shapes, seconds

Times one linear's forward + backward (`linear(x).backward(dy)`, x: [tokens, K] BF16, compiled with static
shapes) in BF16 and with each recipe (its default options, applied to every linear: min_shape=None), for K
(in_features) and N (out_features) each in --sizes (256 to 8192) and the --shapes of the models we train
(llama-120m's 768/2560, ViT-B/16's 768/2304/3072, TinyLlama-1.1B's 2048/256/5632), at 16384 and 4096 tokens. A
time is the GPU time of one call (`--timing gpu`, the default: the kernels' summed durations over --iters calls, from
the profiler), the median of 3 such. In a compiled model the host runs ahead of the GPU (a TinyLlama step on an H100
leaves the GPU idle 5-11 ms of 200-240, docs/benchmarks.md), so what a linear costs a step is its kernels' time;
one lone linear called back to back is host-bound below ~2048 x 2048 at 16384 tokens (BF16 took ~0.5 ms a call
whatever its size there), which `--timing wall` (--iters calls between two CUDA events) shows.

Prints and writes to OUT/bench_small_layers.md, per recipe, the speedup over BF16 of every shape and the MinShape
to put in qt/quantize.py's SMALL_LINEAR_MIN_SHAPE: the thresholds (K >= a and N >= b) that quantize the most
measured shapes while every shape they quantize is at least --min_speedup times as fast as BF16 at every token
count measured. OUT/bench_small_layers.json keeps the measurements for --report. A call stops starting new shapes
after --time_budget_s (the device runs a command for at most 10 minutes): split a full run by --recipes / --tokens
and join the parts with --report (which needs no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing qt
import qt  # noqa: E402

SIZES = [256, 512, 1024, 2048, 4096, 8192]
# (K, N) of the linears of llama-120m, ViT-B/16 and TinyLlama-1.1B (its k/v projections: 2048 -> 256).
MODEL_SHAPES = ["768:768", "768:2560", "2560:768", "768:2304", "768:3072", "3072:768", "2048:2048", "2048:256",
                "2048:5632", "5632:2048"]
TOKENS = [16384, 4096]
BASELINE = "baseline"  # the linear without a recipe, in BF16 (FP32 on the CPU)


def measure(recipe: str | None, k: int, n: int, tokens: int, device: torch.device, compile: bool,
            warmup: int, iters: int, timing: str = "gpu") -> float:
    """Median ms of one forward + backward of an nn.Linear(k, n) without (recipe None) or with `recipe`."""
    torch.manual_seed(0)
    dtype = baseline_dtype(device)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    if recipe is not None:
        qt.quantize_(linear, recipe, filter_fn=lambda module, name: True)
    x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, n, device=device, dtype=dtype)
    torch._dynamo.reset()  # a fresh graph for each shape: no recompile limit, no dynamic shapes
    forward = torch.compile(linear, dynamic=False, options=qt.inductor_options(linear)) if compile else linear

    def step():
        forward(x).backward(dy)

    for _ in range(warmup):
        step()
    timer = gpu_ms if timing == "gpu" and device.type == "cuda" else back_to_back_ms
    return statistics.median(timer(step, iters, device) for _ in range(3))


def gpu_ms(step, iters: int, device: torch.device) -> float:
    """ms of GPU kernel time per call of step(), summed over `iters` calls from the profiler's kernel records."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernel_us = sum(event.self_device_time_total for event in profile.key_averages())
    if kernel_us <= 0:
        raise RuntimeError("the profiler recorded no GPU kernel: rerun with --timing wall")
    return kernel_us / 1e3 / iters


def back_to_back_ms(step, iters: int, device: torch.device) -> float:
    """ms per call of `iters` calls of step() with no synchronization between them."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - start) * 1e3 / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def baseline_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU BF16 matmuls are slow on most CPUs


def run(recipes: list[str], shapes: list[tuple[int, int]], tokens_list: list[int], device: torch.device,
        compile: bool, warmup: int, iters: int, time_budget_s: float, timing: str) -> tuple[list[dict], bool]:
    """(measurements, complete): one dict per (case, tokens, K, N) with its ms or error."""
    started, rows = time.monotonic(), []
    for tokens in tokens_list:
        for k, n in shapes:
            if time.monotonic() - started > time_budget_s:
                return rows, False
            for case in [None, *recipes]:
                row = {"case": case or BASELINE, "tokens": tokens, "K": k, "N": n}
                try:
                    row["ms"] = measure(case, k, n, tokens, device, compile, warmup, iters, timing)
                except Exception as error:  # noqa: BLE001 (a failing shape is a row of the table)
                    row["error"] = f"{type(error).__name__}: {error}"[:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows, True


def shape(text: str) -> tuple[int, int]:
    k, _, n = text.partition(":")
    return int(k), int(n)


def speedups(rows: list[dict]) -> dict[str, dict[tuple[int, int, int], float]]:
    """recipe -> (tokens, K, N) -> baseline ms / recipe ms (0 where the recipe failed), where the baseline ran."""
    baseline = {(r["tokens"], r["K"], r["N"]): r["ms"] for r in rows if r["case"] == BASELINE and "ms" in r}
    result: dict[str, dict[tuple[int, int, int], float]] = {}
    for r in rows:
        key = (r["tokens"], r["K"], r["N"])
        if r["case"] != BASELINE and key in baseline:
            result.setdefault(r["case"], {})[key] = baseline[key] / r["ms"] if "ms" in r else 0.0
    return result


def suggest_min_shape(speedup: dict[tuple[int, int, int], float], min_speedup: float) -> tuple[qt.MinShape, int, int]:
    """(the MinShape, how many measured (K, N) it quantizes, of how many). A shape wins where it is at least
    `min_speedup` times as fast as BF16 at every token count measured; the thresholds are the smallest K and N
    of the largest rectangle K >= a, N >= b of measured shapes that all win. None wins: one past the largest."""
    worst: dict[tuple[int, int], float] = {}
    for (_, k, n), value in speedup.items():
        worst[k, n] = min(value, worst.get((k, n), value))
    ks, ns = sorted({k for k, _ in worst}), sorted({n for _, n in worst})
    best, best_count = qt.MinShape(ks[-1] + 1, ns[-1] + 1), 0
    for a in ks:
        for b in ns:
            inside = [value for (k, n), value in worst.items() if k >= a and n >= b]
            if len(inside) > best_count and min(inside) >= min_speedup:
                best, best_count = qt.MinShape(a, b), len(inside)
    return best, best_count, len(worst)


def report(rows: list[dict], min_speedup: float, header: str) -> str:
    lines = [header, ""]
    for recipe, speedup in speedups(rows).items():
        ks = sorted({k for _, k, _ in speedup})
        ns = sorted({n for _, _, n in speedup})
        for tokens in sorted({t for t, _, _ in speedup}, reverse=True):
            lines += [f"{recipe}, {tokens} tokens: speedup over the baseline (rows: K = in_features, columns: "
                      f"N = out_features)",
                      "", "| K \\ N | " + " | ".join(map(str, ns)) + " |", "| --- " * (len(ns) + 1) + "|"]
            for k in ks:
                cells = [f"{speedup[tokens, k, n]:.2f}" if (tokens, k, n) in speedup else "" for n in ns]
                lines.append(f"| {k} | " + " | ".join(cells) + " |")
            lines.append("")
        least, count, total = suggest_min_shape(speedup, min_speedup)
        verdict = (f"quantize from K >= {least.in_features} and N >= {least.out_features} ({count} of {total} measured "
                   f"shapes, each >= {min_speedup:g}x the baseline at every token count)" if count else
                   f"no measured shape is >= {min_speedup:g}x the baseline at every token count: keep them all in "
                   f"high precision")
        lines += [f"{recipe}: {verdict}; in qt/quantize.py:", "", f'    "{recipe}": {least!r},', ""]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines.append(f"{len(failed)} measurements failed, e.g. {failed[0]}")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(qt.RECIPES), choices=list(qt.RECIPES))
    parser.add_argument("--sizes", nargs="+", type=int, default=SIZES, help="values of K and of N (a full grid)")
    parser.add_argument("--shapes", nargs="*", type=shape, default=[shape(s) for s in MODEL_SHAPES], metavar="K:N",
                        help="more (K, N) to measure")
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument("--min_speedup", type=float, default=1.0, help="what counts as a win over BF16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="calls timed back to back (3 times)")
    parser.add_argument("--timing", choices=("gpu", "wall"), default="gpu",
                        help="gpu: the kernels' time per call (a step that keeps the GPU busy); wall: calls back to back")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--time_budget_s", type=float, default=540.0, help="start no new shape after this")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON", help="only report these measurements")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, no compile: checks the script")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench_small_layers")))
    args = parser.parse_args(argv)
    if args.report:
        parts = [json.loads(path.read_text()) for path in args.report]
        rows = [row for part in parts for row in part["rows"]]
        header = "\n".join(part["header"] for part in parts)
    else:
        if args.smoke:
            args.sizes, args.shapes, args.tokens, args.compile, args.warmup, args.iters = [16, 32], [], [64, 16], False, 1, 2
        elif not torch.cuda.is_available():
            sys.exit("bench_small_layers.py measures GPU kernels: run it on a CUDA GPU (or --smoke on the CPU)")
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        shapes = list(dict.fromkeys([(k, n) for k in args.sizes for n in args.sizes] + args.shapes))
        rows, complete = run(args.recipes, shapes, args.tokens, device, args.compile, args.warmup, args.iters,
                             args.time_budget_s, args.timing)
        where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        timed = (f"GPU kernel time of {args.iters} calls" if args.timing == "gpu" and device.type == "cuda"
                 else f"{args.iters} calls back to back")
        header = (f"`{' '.join(['python', *sys.argv])}`: {where}, torch {torch.__version__}, baseline "
                  f"{str(baseline_dtype(device)).removeprefix('torch.')}, {'compiled' if args.compile else 'eager'}, "
                  f"{timed}, median of 3"
                  + ("" if complete else f"; stopped after {args.time_budget_s:g} s: shapes are missing"))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_small_layers.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    text = report(rows, args.min_speedup, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_small_layers.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
