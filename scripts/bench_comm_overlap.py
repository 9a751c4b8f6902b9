"""Times the training matmuls of a TinyLlama-1.1B step while NCCL all-gathers run beside them, as FSDP2 runs them.

    torchrun --standalone --nproc_per_node 2 scripts/bench_comm_overlap.py [--gather_mb 88] [--margins 0,8,16,32]

Under FSDP2 the next unit's all-gather (and the last unit's reduce-scatter) runs on NCCL's stream while the matmuls
run on the compute stream, and NCCL's kernels hold SMs for as long as they run. qt's Gluon INT8 matmul is
persistent: one program per SM, each with a fixed share of the output tiles, so a program that finds no free SM
starts only when another has finished its whole share. Each row times one matmul alone and then with all-gathers of
--gather_mb MB from each rank (a unit of two TinyLlama blocks in BF16 is ~88 MB a rank on 2 GPUs) queued on NCCL's
stream for the whole timed loop: the INT8 matmul with one program per SM less each --margins (SMs left to NCCL), and
with one program per output tile (the GPU then schedules the tiles as SMs free up), against cuBLAS BF16 and FP8
torch._scaled_mm (row-wise scales). Rank 0 prints a markdown table and, with $OUT set, writes it and a JSON there.
"""

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
import triton

from qt.kernels import int8_mm_gluon

# (matmul, M, N, K) of TinyLlama-1.1B's linears at 8 sequences of 2048 tokens a GPU, K-contiguous operands.
SHAPES = [
    ("q/o output", 16384, 2048, 2048),
    ("gate/up output", 16384, 5632, 2048),
    ("down output", 16384, 2048, 5632),
    ("gate/up grad_weight", 5632, 2048, 16384),
]
MATMULS_PER_TIMING = 10
REPEATS = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gather_mb", type=float, default=88.0, help="MB each rank contributes to an all-gather")
    parser.add_argument("--margins", default=[0, 8, 16, 32], type=lambda text: [int(m) for m in text.split(",")],
                        help="comma-separated SMs the persistent INT8 matmul leaves free (0: one program per SM)")
    return parser.parse_args()


def timed_ms(run, gathers: int, gather_in: torch.Tensor, gather_out: torch.Tensor) -> float:
    """Median milliseconds of one `run()` (a matmul, or an all-gather) over MATMULS_PER_TIMING calls, with `gathers`
    all-gathers queued on NCCL's stream first (the ranks start them together)."""
    samples = []
    for _ in range(REPEATS):
        dist.barrier()
        torch.cuda.synchronize()
        works = [dist.all_gather_into_tensor(gather_out, gather_in, async_op=True) for _ in range(gathers)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(MATMULS_PER_TIMING):
            run()
        end.record()
        for work in works:
            work.wait()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / MATMULS_PER_TIMING)
    return statistics.median(samples)


def matmul_variants(m: int, n: int, k: int, margins: list[int], device: torch.device) -> dict:
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device).t()
    row_scale = torch.rand(m, 1, device=device) + 0.5
    col_scale = torch.rand(1, n, device=device) + 0.5
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    config = int8_mm_gluon.CONFIGS[torch.bfloat16]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(m, config[0]) * triton.cdiv(n, config[1])
    expected = torch._int_mm(a, b).float() * (row_scale * col_scale)
    variants = {}
    for margin in margins:
        def run(programs=sms - margin):
            int8_mm_gluon.launch(a, b, row_scale, col_scale, out, config, programs)
        variants[f"INT8, {sms - margin} programs"] = run
    variants[f"INT8, a program per tile ({tiles})"] = lambda: int8_mm_gluon.launch(
        a, b, row_scale, col_scale, out, config, tiles)
    for name, run in list(variants.items()):
        out.zero_()
        run()
        rel_err = ((out.float() - expected).norm() / expected.norm()).item()
        if rel_err > 1e-2:  # bf16 rounding alone gives ~1e-3
            raise SystemExit(f"{name}: relative error {rel_err:.2e} against torch._int_mm on {m} x {n} x {k}")
    a_fp8 = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
    b_fp8 = torch.randn(n, k, device=device).to(torch.float8_e4m3fn).t()
    a_bf16, b_bf16 = torch.randn(m, k, device=device, dtype=torch.bfloat16), torch.randn(
        k, n, device=device, dtype=torch.bfloat16)
    variants["FP8 torch._scaled_mm, row-wise"] = lambda: torch._scaled_mm(
        a_fp8, b_fp8, row_scale, col_scale, out_dtype=torch.bfloat16)
    variants["BF16 torch.mm (cuBLAS)"] = lambda: torch.mm(a_bf16, b_bf16)
    return variants


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available() or int8_mm_gluon.gluon is None:
        raise SystemExit("bench_comm_overlap.py needs CUDA GPUs with Hopper's Gluon kernel (an H100/H200)")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    gather_in = torch.randn(int(args.gather_mb * 2**20 / 2), dtype=torch.bfloat16, device=device)
    gather_out = torch.empty(world * gather_in.numel(), dtype=torch.bfloat16, device=device)
    for _ in range(3):
        dist.all_gather_into_tensor(gather_out, gather_in)
    one_gather = timed_ms(lambda: dist.all_gather_into_tensor(gather_out, gather_in), 0, gather_in, gather_out)
    rows = []
    for shape_name, m, n, k in SHAPES:
        for name, run in matmul_variants(m, n, k, args.margins, device).items():
            for _ in range(3):
                run()
            alone = timed_ms(run, 0, gather_in, gather_out)
            # Enough all-gathers queued to outlast the timed matmuls twice over, as many on every rank.
            gathers = torch.tensor(max(2, round(2 * alone * MATMULS_PER_TIMING / one_gather)), device=device)
            dist.all_reduce(gathers, op=dist.ReduceOp.MAX)
            gathers = int(gathers)
            beside = timed_ms(run, gathers, gather_in, gather_out)
            rows.append({"matmul": shape_name, "m": m, "n": n, "k": k, "kernel": name, "alone_us": 1e3 * alone,
                         "beside_all_gather_us": 1e3 * beside, "slowdown": beside / alone,
                         "tops_alone": 2 * m * n * k / alone / 1e9})
    per_rank = [None] * world
    dist.all_gather_object(per_rank, rows)
    if rank == 0:
        protocol = os.environ.get("NCCL_PROTO", "NCCL's choice")
        lines = [f"{world} x {torch.cuda.get_device_name(device)}, torch {torch.__version__}, Triton "
                 f"{triton.__version__}, NCCL_PROTO {protocol}. All-gather of {args.gather_mb:g} MB a rank alone: "
                 f"{one_gather:.2f} ms "
                 f"({args.gather_mb * (world - 1) / one_gather:.0f} MB/ms received a rank).", "",
                 "| matmul (M x N x K) | kernel | TOP/s alone | us alone | us beside all-gathers | slowdown, rank 0 "
                 "| slowdown, other ranks |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for i, row in enumerate(rows):
            others = " / ".join(f"{r[i]['slowdown']:.2f}x" for r in per_rank[1:])
            lines.append(f"| {row['matmul']} ({row['m']} x {row['n']} x {row['k']}) | {row['kernel']} | "
                         f"{row['tops_alone']:.0f} | {row['alone_us']:.1f} | {row['beside_all_gather_us']:.1f} | "
                         f"{row['slowdown']:.2f}x | {others} |")
        table = "\n".join(lines)
        print(table)
        if os.environ.get("OUT"):
            out_dir = Path(os.environ["OUT"])
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "comm_overlap.md").write_text(table + "\n")
            (out_dir / "comm_overlap.json").write_text(json.dumps({"gather_ms": one_gather, "ranks": per_rank}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
