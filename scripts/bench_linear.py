"""Forward + backward time of one quantized linear, per recipe, against BF16 and torchao.

Run on a GPU (the device machine):
    python scripts/bench_linear.py [--compile] [--tokens 16384] [--out DIR]

Each case builds nn.Linear(K, N) in BF16 on Llama-1B shapes, applies a recipe, and times
`y = linear(x); y.backward(dy)` (x: [tokens, K] BF16) with CUDA events (median of many runs).
Also checks every recipe's output against the BF16 linear (SQNR), so a fast wrong kernel shows.
torchao's versions of the same recipes run in the same process when `import torchao` works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qt  # noqa: E402
from qt.sqnr import sqnr_db  # noqa: E402

SHAPES = [(2048, 2048), (2048, 256), (2048, 5632), (5632, 2048)]  # (in_features K, out_features N), TinyLlama-1.1B


def qt_case(recipe, **kwargs):
    def apply(linear):
        return qt.quantize_(nn.Sequential(linear), recipe, filter_fn=lambda m, n: True, **kwargs)[0]

    return apply


def torchao_cases():
    try:
        from torchao import quantize_ as ao_quantize_
        from torchao.prototype import quantized_training as ao_qt
    except Exception as error:  # torchao absent or incompatible with this torch
        print(f"torchao unavailable ({type(error).__name__}: {error}); its rows are skipped")
        return {}

    def ao(config_factory):
        def apply(linear):
            model = nn.Sequential(linear)
            ao_quantize_(model, config_factory())
            return model[0]

        return apply

    cases = {}
    for name, attr in [
        ("torchao int8_mixed_precision", "int8_mixed_precision_training"),
        ("torchao int8_weight_only", "int8_weight_only_quantized_training"),
        ("torchao bitnet", "bitnet_training"),
    ]:
        if hasattr(ao_qt, attr):
            cases[name] = ao(getattr(ao_qt, attr))
    return cases


def bench(fn, warmup=10, iters=50):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def print_kernel_times(step, title, steps=5):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(f"CUDA kernels of {title}, {steps} steps:")
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--compile", action="store_true", help="torch.compile each linear (all rows)")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--profile", metavar="CASES", default="",
                        help="comma-separated cases whose CUDA kernel times to print too (per shape)")
    parser.add_argument("--cases", help="comma-separated case names to run (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_linear.py needs a CUDA GPU")

    cases = {
        "bf16": lambda linear: linear,
        "qt int8_mixed_precision": qt_case("int8_mixed_precision"),
        "qt int8_mixed_precision (fwd only int8)": qt_case("int8_mixed_precision", grad_input=False, grad_weight=False),
        "qt int8_weight_only": qt_case("int8_weight_only"),
        "qt int8_weight_only + int8 activations": qt_case("int8_weight_only", int8_activations=True),
        "qt bitnet": qt_case("bitnet"),
        "qt fp8_mixed_precision": qt_case("fp8_mixed_precision"),
        "qt fp8_mixed_precision rowwise": qt_case("fp8_mixed_precision", scaling="rowwise"),
        **torchao_cases(),
    }
    if args.cases:
        cases = {name: cases[name] for name in args.cases.split(",")}
    rows = []
    for k, n in SHAPES:
        torch.manual_seed(0)
        base = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)
        reference = base(x).detach()
        flops = 3 * 2 * args.tokens * k * n  # forward + two backward matmuls
        for name, apply in cases.items():
            linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            linear.load_state_dict(base.state_dict())
            try:
                linear = apply(linear)
                torch._dynamo.reset()
                forward = torch.compile(linear, options=qt.inductor_options(linear)) if args.compile else linear
                xr = x.detach().requires_grad_()

                def step():
                    forward(xr).backward(dy)

                with torch.no_grad():
                    quality = sqnr_db(linear(x), reference)
                ms = bench(step)
                if name in args.profile.split(","):
                    print_kernel_times(step, f"{name}, {args.tokens}x{k}->{n}")
                rows.append(dict(shape=f"{args.tokens}x{k}->{n}", case=name, ms=ms, tflops=flops / ms / 1e9,
                                 sqnr_db=quality))
            except Exception as error:
                rows.append(dict(shape=f"{args.tokens}x{k}->{n}", case=name, error=f"{type(error).__name__}: {error}"[:200]))
            print(rows[-1], flush=True)

    baseline = {r["shape"]: r["ms"] for r in rows if r["case"] == "bf16"}
    lines = [
        f"Forward+backward of one linear, {args.tokens} tokens, BF16 activations, "
        f"{'compiled' if args.compile else 'eager'}; {torch.cuda.get_device_name()}, torch {torch.__version__}",
        "",
        "| shape | case | ms | effective TFLOP/s | speedup vs bf16 | SQNR vs bf16 (dB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['case']} | error: {r['error']} | | | |")
        else:
            lines.append(f"| {r['shape']} | {r['case']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                         f"{baseline[r['shape']] / r['ms']:.2f}x | {r['sqnr_db']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        suffix = "compiled" if args.compile else "eager"
        with open(os.path.join(args.out, f"bench_linear_{suffix}.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, f"bench_linear_{suffix}.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
