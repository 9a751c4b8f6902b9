"""Where a profiled step's GPU time goes: a table from the Chrome trace `llm_pretrain.py --profile` writes.

    python scripts/trace_summary.py RUN_DIR/profile/trace_rank0.json [MORE_TRACES ...] [--steps 3]

Groups the trace's GPU kernels by what they do (INT8 and cuBLAS matmuls, qt's quantize kernels and copies, attention,
Inductor's fused kernels, the optimizer, communication, the rest), per step (the profiler records --steps steps),
and sets the time the GPU worked (the union of its kernels on every stream) against the wall time of the
profiled steps: the difference is time the GPU waited, on the host or on nothing at all. On several GPUs the time
it computed (every kernel but NCCL's) against the wall time says how much communication or the host left exposed.

--idle_causes adds where the GPU waited: each stretch with no kernel on any stream is set against the host op that
launched the kernel ending it (the outermost op around that launch on its thread, layer numbers as N), summed per
step. A stretch that ends with a kernel launched late says the host was behind there.

--host_ops N adds where the host's time goes: on each thread that launched GPU work (Python's: the forward and the
optimizer; autograd's: the backward), the outermost host ops summed per step by name (layer and graph numbers
taken out), the N longest, and how long that thread was inside any op. Where the GPU waits on the host, these
are the host's costs to cut (the profiler slows the host, so read them loosely).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

COMMUNICATION = "communication (NCCL)"
# Trace event categories: kernels and copies on the GPU, ops on the host, and the launches between them.
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
# First match wins: (group, pattern on the kernel name).
GROUPS = [
    (COMMUNICATION, r"nccl"),
    # Not Inductor's kernels named after the opaque Gluon op they feed (triton_..._scaled_int8_mm_gluon_...).
    ("INT8 matmuls (qt)", r"^(?!triton_).*scaled_int8_mm"),
    ("qt quantize kernels", r"_quantize|_tile_amax"),
    ("qt column-major copies of INT8 codes", r"_to_column_major"),
    ("attention", r"flash|fmha|attention|cudnn"),
    ("cuBLAS / CUTLASS matmuls", r"nvjet|gemm|cutlass|sm90_xmma|ampere_|cublas"),
    ("optimizer (fused / foreach; qt's INT8 Adam)", r"multi_tensor_apply|fused_adam|FusedAdam|_foreach|_adam_kernel"),
    ("Inductor's fused kernels", r"^triton_"),
    ("copies and fills", r"copy|fill|Memset|Memcpy|elementwise_kernel"),
]


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other"


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of the [start, end) intervals."""
    total, current_end = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if start > current_end:
            total += end - start
            current_end = end
        elif end > current_end:
            total += end - current_end
            current_end = end
    return total


def events_of(events: list[dict], categories: tuple[str, ...]) -> list[dict]:
    """The complete events (with a duration) of the trace in `categories`."""
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in categories]


def summarize(events: list[dict], steps: int, kernels_listed: int = 15) -> dict:
    """The trace's figures per step; `kernels_listed`: how many kernels (by total time) the table lists."""
    kernels = events_of(events, GPU_CATEGORIES)
    if not kernels:
        raise SystemExit("error: the trace holds no GPU kernels (was it recorded on a GPU with CUDA activity?)")
    per_group = defaultdict(float)
    top = defaultdict(lambda: [0.0, 0])
    intervals, compute = [], []  # every kernel's [start, end), and those of all but communication
    for kernel in kernels:
        group, interval = group_of(kernel["name"]), (kernel["ts"], kernel["ts"] + kernel["dur"])
        per_group[group] += kernel["dur"]
        top[kernel["name"]][0] += kernel["dur"]
        top[kernel["name"]][1] += 1
        intervals.append(interval)
        if group != COMMUNICATION:
            compute.append(interval)
    wall = max(end for _, end in intervals) - min(start for start, _ in intervals)
    return {
        "steps": steps,
        "wall_ms": wall / 1e3 / steps,
        "busy_ms": busy_time(intervals) / 1e3 / steps,
        "compute_busy_ms": busy_time(compute) / 1e3 / steps,
        "groups_ms": {g: t / 1e3 / steps for g, t in sorted(per_group.items(), key=lambda kv: -kv[1])},
        "top_kernels": [(name, t / 1e3 / steps, calls // steps)
                        for name, (t, calls) in sorted(top.items(), key=lambda kv: -kv[1][0])[:kernels_listed]],
    }


def host_label(name: str) -> str:
    """A host op's name with what differs from one layer or compiled graph to the next taken out."""
    name = re.sub(r"layers\.\d+", "layers.N", name)
    name = re.sub(r"(Torch-Compiled Region): \d+/\d+", r"\1", name)
    return re.sub(r"(CompiledFxGraph) \w+", r"\1", name)


def idle_causes(events: list[dict], steps: int, top: int = 10) -> list[tuple[str, float, float]]:
    """(host op, GPU idle ms a step, stretches a step) for the `top` host ops whose launches ended the longest
    total GPU idle time: see the module's docstring."""
    kernels = sorted(events_of(events, GPU_CATEGORIES), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events_of(events, LAUNCH_CATEGORIES)
                if "correlation" in e.get("args", {})}
    host_ops = defaultdict(list)
    for e in events_of(events, HOST_CATEGORIES):
        if not e["name"].startswith("ProfilerStep"):
            host_ops[e["tid"]].append(e)

    def launched_in(launch: dict | None) -> str:
        if launch is None:
            return "(launch not in the trace)"
        around = [e for e in host_ops[launch["tid"]] if e["ts"] <= launch["ts"] <= e["ts"] + e["dur"]]
        return host_label(max(around, key=lambda e: e["dur"])["name"]) if around else "(no host op around it)"

    idle, stretches = defaultdict(float), defaultdict(int)
    busy_until = kernels[0]["ts"] + kernels[0]["dur"] if kernels else 0
    for kernel in kernels[1:]:
        if kernel["ts"] > busy_until:
            label = launched_in(launches.get(kernel.get("args", {}).get("correlation")))
            idle[label] += kernel["ts"] - busy_until
            stretches[label] += 1
        busy_until = max(busy_until, kernel["ts"] + kernel["dur"])
    ranked = sorted(idle.items(), key=lambda kv: -kv[1])[:top]
    return [(label, us / 1e3 / steps, stretches[label] / steps) for label, us in ranked]


def host_ops(events: list[dict], steps: int, top: int) -> list[tuple[int, float, list[tuple[str, float, float]]]]:
    """For each host thread that launched GPU work, most launches first (the Python thread runs the forward and the
    optimizer, autograd's the backward): (thread id, ms a step it spent inside host ops, [(host op, ms a step,
    calls a step)] for its `top` longest outermost ops by total time)."""
    launches = defaultdict(int)
    for launch in events_of(events, LAUNCH_CATEGORIES):
        launches[launch["tid"]] += 1
    threads = []
    for tid in sorted(launches, key=launches.get, reverse=True):
        ops = sorted((e for e in events_of(events, HOST_CATEGORIES)
                      if e["tid"] == tid and not e["name"].startswith("ProfilerStep")),
                     key=lambda e: (e["ts"], -e["dur"]))
        if not ops:  # e.g. NCCL's own thread
            continue
        total, calls = defaultdict(float), defaultdict(int)
        outer_end = float("-inf")
        for op in ops:
            if op["ts"] >= outer_end:  # not inside the previous outermost op
                label = host_label(op["name"])
                total[label] += op["dur"]
                calls[label] += 1
                outer_end = op["ts"] + op["dur"]
        inside = busy_time([(op["ts"], op["ts"] + op["dur"]) for op in ops])
        ranked = sorted(total.items(), key=lambda kv: -kv[1])[:top]
        threads.append((tid, inside / 1e3 / steps, [(label, us / 1e3 / steps, calls[label] / steps)
                                                    for label, us in ranked]))
    return threads


def host_markdown(threads: list[tuple[int, float, list[tuple[str, float, float]]]]) -> str:
    lines = []
    for tid, inside_ms, ops in threads:
        lines += ["", f"Host thread {tid} was inside host ops {inside_ms:.1f} ms a step; its outermost ops:", "",
                  "| host op | ms | calls |", "| --- | ---: | ---: |"]
        lines += [f"| `{label[:90]}` | {ms:.1f} | {count:.0f} |" for label, ms, count in ops]
    return "\n".join(lines) + "\n"


def idle_markdown(causes: list[tuple[str, float, float]]) -> str:
    lines = ["", "| the GPU idle until a kernel launched in (host op) | ms | stretches |", "| --- | ---: | ---: |"]
    lines += [f"| `{label[:90]}` | {ms:.1f} | {count:.0f} |" for label, ms, count in causes]
    return "\n".join(lines) + "\n"


def markdown(summary: dict, title: str) -> str:
    lines = [f"{title}: {summary['steps']} profiled steps, per step", "",
             "| | ms |", "| --- | ---: |",
             f"| wall time (first kernel start to last kernel end) | {summary['wall_ms']:.1f} |",
             f"| GPU busy (union of kernels) | {summary['busy_ms']:.1f} |",
             f"| GPU idle | {summary['wall_ms'] - summary['busy_ms']:.1f} |",
             f"| GPU computing (union of kernels but communication) | {summary['compute_busy_ms']:.1f} |",
             f"| no computation (wall - computing: waits on communication or the host) | "
             f"{summary['wall_ms'] - summary['compute_busy_ms']:.1f} |"]
    lines += [f"| {group} | {ms:.1f} |" for group, ms in summary["groups_ms"].items()]
    lines += ["", "| kernel | ms | calls | us a call |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| `{_shortened(name)}` | {ms:.2f} | {calls} | {1e3 * ms / max(calls, 1):.1f} |"
              for name, ms, calls in summary["top_kernels"]]
    return "\n".join(lines) + "\n"


def _shortened(name: str, width: int = 100) -> str:
    """A kernel name cut to `width` characters, keeping its end: Inductor's names differ in their last part (the
    ops fused, then the kernel's number)."""
    return name if len(name) <= width else name[:width // 2 - 2] + "..." + name[-(width // 2 - 1):]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", type=Path, nargs="+", help="one table each, in turn")
    parser.add_argument("--steps", type=int, default=3, help="steps each trace holds (llm_pretrain's profiler: 3)")
    parser.add_argument("--kernels", type=int, default=15, help="how many kernels the table lists, by total time")
    parser.add_argument("--idle_causes", action="store_true",
                        help="also the host ops whose launches ended the GPU's idle stretches (see above)")
    parser.add_argument("--host_ops", type=int, default=0, metavar="N",
                        help="also the N host ops of each launching thread that took the most time (see above)")
    args = parser.parse_args(argv)
    if args.host_ops < 0:
        parser.error(f"--host_ops {args.host_ops}: give how many host ops to list (0: none)")
    if args.kernels < 1:
        parser.error(f"--kernels {args.kernels}: list at least one kernel")
    for trace in args.traces:
        if not trace.is_file():
            raise SystemExit(f"error: no trace at {trace}: run llm_pretrain.py with --profile first")
    tables = []
    for trace in args.traces:
        events = load_events(trace)
        tables.append(markdown(summarize(events, args.steps, args.kernels), str(trace))
                      + (idle_markdown(idle_causes(events, args.steps)) if args.idle_causes else "")
                      + (host_markdown(host_ops(events, args.steps, args.host_ops)) if args.host_ops else ""))
    text = "\n".join(tables)
    print(text)
    return text


if __name__ == "__main__":
    main()
