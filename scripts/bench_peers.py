"""qt's recipes against BF16 and torchao's training recipes: the same model trained a few dozen steps per row.

    python scripts/bench_peers.py --models tinyllama-1.1b --only qt --out $OUT/qt.md          # one GPU
    python scripts/bench_peers.py --models tinyllama-1.1b --only torchao --out $OUT/torchao.md
    python scripts/bench_peers.py --models llama-120m --out $OUT/120m.md
    python scripts/bench_peers.py --report A.json B.json C.json --out docs/peers.md          # joined, no GPU
    python scripts/bench_peers.py --smoke --out /tmp/peers.md                                 # CPU, seconds

Each row trains in a fresh process: configs/models/MODEL.json (TinyLlama-1.1B at seq 2048 x batch 8, the 124M
Llama at seq 1024 x batch 16: 16k tokens a step), BF16 weights, each decoder block compiled, AdamW (fused where
every weight takes it) as llm_pretrain.py builds it, on a fixed synthetic token stream that can be learned. Rows:
the BF16 baseline, every recipe of qt.RECIPES with its defaults (the small-layer rule included; a new recipe
appears by itself), and torchao's float8 training (tensorwise and rowwise), INT8 mixed precision (module swap,
the path that quantizes) and BitNet (after the same BitNet model surgery as qt's row), every linear but the LM
head. torchao is a benchmark-only dependency, imported only in its rows' processes.

Per row: tokens/s (tokens a step over the median step time after --warmup steps, timed with CUDA events and no
synchronization between steps), speedup over the baseline of the same call, peak GPU memory, final loss (mean of
the last 5 steps) and the forward SQNR of one quantized linear against its float64 twin (qt.sqnr), flagged where
the row did not quantize. Writes OUT (markdown, with the command, GPU and versions) and OUT with .json, which
--report joins with other calls' (the device runs a command for at most 10 minutes).

Before and after a change, in one device call (a speedup counts only against a baseline of the same machine and
call): `--qt_from DIR` trains every row with the qt package of another checkout (e.g. `git worktree add DIR REV`,
or `git archive REV qt configs | tar -x -C DIR`): run the script once with it and once without, in the same call.
Setting PYTHONPATH does not do it: this script puts its own checkout first on the import path.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The checkout whose qt a row's process imports (--qt_from), passed from the calling process.
QT_FROM_VARIABLE = "BENCH_PEERS_QT_FROM"
sys.path.insert(0, str(REPO))  # run from anywhere without installing qt
if os.environ.get(QT_FROM_VARIABLE):
    sys.path.insert(0, os.environ[QT_FROM_VARIABLE])

import qt  # noqa: E402
from qt.sqnr import forward_sqnr, random_input, sqnr_cell, twin_sqnr  # noqa: E402

# Sequence length and batch of each model's rows.
MODELS = {"tinyllama-1.1b": (2048, 8), "llama-120m": (1024, 16), "tiny": (64, 2)}
TORCHAO_ROWS = ("torchao float8 tensorwise", "torchao float8 rowwise", "torchao int8_mixed_precision module_swap",
                "torchao bitnet")
TORCHAO_RELEASE = "0.17.0"  # the torchao release built against torch 2.11 (the device's)
FINAL_LOSS_STEPS = 5
ACTIVE_TOKENS = 1024  # the synthetic stream's tokens: learnable within a few dozen steps


# qt rows beyond each recipe's defaults: the options the speed targets name, and grad_weight from the forward's codes
# or not (fewer quantize passes, but a column-major copy of the codes: int8_mixed_precision's default since round
# 11, where qt's kernel makes that copy; docs/benchmarks.md).
QT_VARIANTS = {"int8_weight_only": {"int8_activations": {"int8_activations": True}},
               "int8_mixed_precision": {"X by columns": {"grad_weight_sees_quantized_input": False},
                                        "token blocks": {"grad_weight_token_blocks": True}},
               "bitnet": {"high-precision backward": {"int8_backward": False},
                          "token blocks": {"grad_weight_token_blocks": True}},
               "fp8_mixed_precision": {"codes": {"grad_weight_sees_quantized_input": True},
                                       "rowwise": {"scaling": "rowwise"},
                                       "rowwise X by columns": {"scaling": "rowwise",
                                                                "grad_weight_sees_quantized_input": False}}}


def qt_rows(small_linears: bool) -> dict[str, tuple[str, dict]]:
    """Row name -> (recipe, options): every recipe with its defaults, then its QT_VARIANTS."""
    suffix = ", small linears too" if small_linears else ""
    rows = {}
    for recipe in qt.RECIPES:
        rows[f"qt {recipe}{suffix}"] = (recipe, {})
        for variant, options in QT_VARIANTS.get(recipe, {}).items():
            rows[f"qt {recipe} {variant}{suffix}"] = (recipe, options)
    return rows


def row_names(small_linears: bool) -> list[str]:
    return list(qt_rows(small_linears)) + list(TORCHAO_ROWS)


def torchao_missing() -> str | None:
    """Why torchao's rows cannot run here, or None."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao not installed"
    return None


# ---- one row, in its own process ----

def synthetic_batch(step: int, batch_size: int, seq_len: int, vocab_size: int, device: torch.device):
    """(inputs, targets): runs that climb through ACTIVE_TOKENS ids by 1 to 4 at a time, the same for every row."""
    generator = torch.Generator(device).manual_seed(step)
    start = torch.randint(0, ACTIVE_TOKENS, (batch_size, 1), generator=generator, device=device)
    steps = torch.randint(1, 5, (batch_size, seq_len), generator=generator, device=device)
    tokens = torch.cat([start, start + steps.cumsum(1)], dim=1) % min(ACTIVE_TOKENS, vocab_size)
    return tokens[:, :-1], tokens[:, 1:]


def apply_row(model, row: str, small_linears: bool) -> None:
    """Quantize `model` as row `row` says (nothing for the baseline)."""
    not_head = lambda module, name: isinstance(module, torch.nn.Linear) and name != "lm_head"  # noqa: E731
    if row.startswith("qt "):
        recipe, options = qt_rows(small_linears)[row]
        qt.quantize_(model, recipe, min_shape=None if small_linears else "auto", **options)
        print(qt.quantization_summary(model), flush=True)
        if recipe == "bitnet":
            qt.convert_llama_to_bitnet(model)  # the layers with a BitNet linear
    elif row.startswith("torchao float8 "):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        recipe = row.removeprefix("torchao float8 ")
        convert_to_float8_training(model, module_filter_fn=not_head, config=Float8LinearConfig.from_recipe_name(recipe))
    elif row == "torchao int8_mixed_precision module_swap":
        from torchao import quantize_
        from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingConfig
        quantize_(model, Int8MixedPrecisionTrainingConfig(module_swap=True), filter_fn=not_head)
    elif row == "torchao bitnet":
        from torchao import quantize_
        from torchao.prototype.quantized_training import bitnet_training
        qt.convert_llama_to_bitnet(model, layers="all")  # torchao's BitNet takes every linear
        quantize_(model, bitnet_training(), filter_fn=not_head)


def torchao_forward_sqnr(model, dtype: torch.dtype, tokens: int = 256) -> dict | None:
    """qt.sqnr's measurement for a torchao row: the largest linear torchao converted (a swapped module class or
    a weight subclass; else the largest linear), its forward against F.linear in float64 with its high-precision
    weight (a subclass's `_data`)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    converted = [(name, m) for name, m in linears
                 if type(m) is not torch.nn.Linear or type(m.weight) not in (torch.nn.Parameter, torch.Tensor)]
    if not linears:
        return None
    name, linear = max(converted or linears, key=lambda item: item[1].weight.numel())
    weight = getattr(linear.weight, "_data", linear.weight)
    with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
        x = random_input(weight.shape[1], tokens, weight.device, dtype)
        db = twin_sqnr(linear, weight, linear.bias, x)
    return {"layer": name, "db": db, "quantized": bool(converted)}


def train_row(spec: dict) -> dict:
    from qt.training.config import TrainConfig
    from qt.training.distributed import Dist, parallelize
    from qt.training.models import build_causal_lm, decoder_blocks, load_model_config, next_token_loss
    from qt.training.optimizer import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() and not spec["smoke"] else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU BF16 matmuls are slow on most CPUs
    torch.manual_seed(0)
    vocab_size = load_model_config(spec["model"], spec["seq_len"]).vocab_size
    model = build_causal_lm(spec["model"], None, vocab_size, spec["seq_len"], device).to(dtype)
    apply_row(model, spec["row"], spec["small_linears"])
    if spec["row"].startswith("torchao"):
        sqnr = torchao_forward_sqnr(model, dtype)
    else:
        result = forward_sqnr(model, dtype)
        sqnr = result and {"layer": result.layer, "db": result.db, "quantized": result.quantized}
    print(f"forward SQNR: {sqnr}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parallelize(model, decoder_blocks(model), Dist(0, 1, device), compute_dtype=dtype, activation_checkpointing=False,
                compile=spec["compile"], ddp=False)
    optimizer = build_optimizer(model, TrainConfig(lr=spec["lr"]))
    def train_step(step: int) -> torch.Tensor:
        loss = next_token_loss(model, synthetic_batch(step, spec["batch_size"], spec["seq_len"], vocab_size, device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses, ends = [], []
    for step in range(spec["steps"]):
        losses.append(train_step(step))
        if device.type == "cuda":
            ends.append(torch.cuda.Event(enable_timing=True))
            ends[-1].record()
        else:
            ends.append(time.perf_counter())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        step_times = [a.elapsed_time(b) / 1e3 for a, b in zip(ends, ends[1:])]  # of steps 2, 3, ...
    else:
        step_times = [b - a for a, b in zip(ends, ends[1:])]
    times = step_times[spec["warmup"] - 1:]  # the steps after the warmup
    if spec.get("trace"):
        profile_steps(train_step, spec["steps"], spec["trace"])
    losses = torch.stack(losses).float().tolist()
    return {"tokens_per_second": spec["batch_size"] * spec["seq_len"] / statistics.median(times),
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            "final_loss": statistics.fmean(losses[-FINAL_LOSS_STEPS:]), "sqnr": sqnr,
            "qt": str(Path(qt.__file__).resolve().parent)}


def profile_steps(train_step, first_step: int, trace: str, steps: int = 3) -> None:
    """`steps` more steps under the profiler, after the timed ones (which it would slow): their GPU kernels as a
    Chrome trace at `trace` and, in the row's log, the table of scripts/trace_summary.py."""
    from trace_summary import load_events, markdown, summarize  # beside this script, whichever qt the row runs

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for step in range(first_step, first_step + steps):
            train_step(step)
        torch.cuda.synchronize()
    profiler.export_chrome_trace(trace)
    print(markdown(summarize(load_events(Path(trace)), steps, kernels_listed=30), trace), flush=True)


# ---- the calling process ----

def run_row(spec: dict, log: Path, timeout_s: float, qt_from: Path | None = None) -> dict:
    """Row `spec` trained in a fresh process (its output in `log`), with the qt of the checkout `qt_from` where
    given: its results, or {"error": ...}."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, QT_FROM_VARIABLE: str(qt_from)} if qt_from else None
    try:
        with open(log, "w") as f:
            done = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:g} s (see {log.name})"}
    results = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    if done.returncode or not results:
        last = log.read_text().strip().splitlines()[-1:] or [""]
        return {"error": f"exit {done.returncode}: {last[0][:160]} (see {log.name})"}
    return json.loads(results[-1].removeprefix("RESULT "))


def call_header(argv: list[str], device: str) -> str:
    versions = f"torch {torch.__version__}"
    if torchao_missing() is None:
        versions += f", torchao {importlib.metadata.version('torchao')}"
    return f"`python scripts/bench_peers.py {' '.join(argv)}` on {device} ({versions})"


def markdown(calls: list[dict]) -> str:
    """One table per model, rows from every call (a later call's row replaces an earlier one of the same name)."""
    lines = ["# qt and its peers: training throughput, memory and whether each row quantized", "",
             "Calls (each row's speedup is over the baseline of its own call):", ""]
    lines += [f"{i}. {call['header']}" for i, call in enumerate(calls, 1)]
    models = dict.fromkeys(row["model"] for call in calls for row in call["rows"])
    for model in models:
        rows = {}
        for i, call in enumerate(calls, 1):
            for row in call["rows"]:
                if row["model"] == model:
                    rows[row["row"]] = {**row, "call": i}
        seq_len, batch_size = next(iter(rows.values()))["shape"]
        lines += ["", f"## {model}, seq {seq_len} x batch {batch_size}", "",
                  "| row | tok/s | speedup | peak memory (GB) | final loss | forward SQNR (dB) | call |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, row in rows.items():
            r = row["result"]
            if "error" in r or "skipped" in r:
                lines.append(f"| {name} | {r.get('error') or r['skipped']} | | | | | {row['call']} |")
                continue
            sqnr = r["sqnr"]
            cell = sqnr_cell(sqnr and sqnr["db"], not row["baseline"])
            if sqnr and not sqnr["quantized"] and not row["baseline"]:
                cell = f"{sqnr['db']:.1f} (no linear quantized)"
            memory = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}"
            speedup = "n/a (the baseline failed)" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            lines.append(f"| {name} | {r['tokens_per_second']:,.0f} | {speedup} | {memory} | "
                         f"{r['final_loss']:.3f} | {cell} | {row['call']} |")
    lines += ["", "Forward SQNR: the row's largest quantized linear against its float64 twin, on a fixed random "
              "input; 50 dB or more is no more than rounding to BF16. Final loss: mean of the last "
              f"{FINAL_LOSS_STEPS} steps on the synthetic stream (ln {ACTIVE_TOKENS} = 6.93 knows only which tokens "
              "occur, ln 4 = 1.39 has learned the stream)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tinyllama-1.1b", "llama-120m"], choices=list(MODELS))
    parser.add_argument("--only", nargs="+", metavar="PREFIX",
                        help="rows whose name starts so, or is PREFIX less a closing $ (the baseline always runs)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (compilation)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--quantize_small_linears", action="store_true", help="qt rows quantize every linear")
    parser.add_argument("--row_timeout_s", type=float, default=420)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "peers.md")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON", help="only join these calls' results")
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny model, 2 steps, the qt rows only")
    parser.add_argument("--profile", action="store_true",
                        help="per row, 3 more steps profiled: a trace beside its log, the kernel table in the log")
    parser.add_argument("--qt_from", type=Path, metavar="DIR",
                        help="train every row with the qt package of the checkout DIR (a folder holding qt/ and "
                             "configs/; this script's training code runs against its qt, so a recent one): the "
                             "other side of a before/after comparison in one call")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.qt_from:
        args.qt_from = args.qt_from.resolve()
        missing = [name for name in ("qt/__init__.py", "configs/models") if not (args.qt_from / name).exists()]
        if missing:
            parser.error(f"--qt_from {args.qt_from} holds no {' or '.join(missing)}: give a checkout of this "
                         f"repository (git worktree add DIR REV)")
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no step to time after --warmup {args.warmup}")
    if args.worker:
        print("RESULT " + json.dumps(train_row(json.loads(args.worker))), flush=True)
        return ""
    if args.report:
        calls = [call for path in args.report for call in json.loads(path.read_text())["calls"]]
    else:
        calls = [measure_call(args, argv)]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"calls": calls}, indent=1))
    text = markdown(calls)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return text


def row_is_chosen(name: str, prefix: str) -> bool:
    """`--only`'s rule: `name` starts with `prefix`, or is `prefix` less its closing $ (a row whose name other rows'
    names start with, alone)."""
    return name == prefix[:-1] if prefix.endswith("$") else name.startswith(prefix)


def measure_call(args, argv: list[str]) -> dict:
    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        sys.exit("bench_peers.py measures training on a CUDA GPU: run it there (or --smoke on the CPU)")
    models, steps, warmup = (["tiny"], 2, 1) if args.smoke else (args.models, args.steps, args.warmup)
    torchao_reason = torchao_missing() or ("--smoke runs the qt rows only" if args.smoke else None)
    if torchao_missing():
        print(f"{torchao_missing()}: its rows are skipped. They need `{sys.executable} -m pip install "
              f"torchao=={TORCHAO_RELEASE}` (the release for torch 2.11; a benchmark-only dependency)", flush=True)
    logs = args.out.parent / f"{args.out.stem}_logs"
    logs.mkdir(parents=True, exist_ok=True)
    baseline = "bf16" if gpu else "fp32"
    rows = []
    for model in models:
        seq_len, batch_size = MODELS[model]
        names = [name for name in row_names(args.quantize_small_linears)
                 if not args.only or any(row_is_chosen(name, prefix) for prefix in args.only)]
        base_speed = None
        for name in [baseline, *names]:
            spec = {"model": model, "row": name, "seq_len": seq_len, "batch_size": batch_size, "steps": steps,
                    "warmup": warmup, "lr": args.lr, "compile": gpu, "smoke": args.smoke,
                    "small_linears": args.quantize_small_linears}
            log = logs / f"{model}-{name.replace(' ', '_').replace(',', '')}.log"
            if args.profile and gpu:
                spec["trace"] = str(log.with_suffix(".trace.json"))
            if name.startswith("torchao") and torchao_reason:
                result = {"skipped": f"skipped: {torchao_reason}"}
            else:
                result = run_row(spec, log, args.row_timeout_s, args.qt_from)
            if name == baseline:
                base_speed = result.get("tokens_per_second")
            if "tokens_per_second" in result:
                result["speedup"] = base_speed and result["tokens_per_second"] / base_speed
            rows.append({"model": model, "row": name, "baseline": name == baseline, "shape": [seq_len, batch_size],
                         "result": result})
            print(json.dumps(rows[-1]), flush=True)
    header = call_header(argv, torch.cuda.get_device_name() if gpu else "the CPU")
    return {"header": header + (f", qt from {args.qt_from}" if args.qt_from else ""), "rows": rows}


if __name__ == "__main__":
    main()
