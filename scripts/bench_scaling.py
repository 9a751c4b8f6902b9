"""Multi-GPU scaling of llm_pretrain.py, and resuming a run on another GPU count.

    PYTHONPATH=. python scripts/bench_scaling.py --dataset_dir DATA --output docs/scaling.md \
        [--config configs/runs/throughput_tinyllama.yaml] [--gpus 1 2 4] [--recipes bf16 int8_mixed_precision ...] \
        [--resume_config configs/runs/convergence_120m.yaml --resume_recipes bf16 int8_mixed_precision]

Scaling: each recipe trains the config on 1, 2, 4... GPUs at the same per-GPU batch (the config's batch_size on one
GPU), each run in a fresh process (torchrun with FSDP2 on several GPUs). Per run: tok/s (the median of the logged
intervals after the first, which holds compilation), tok/s per GPU, scaling efficiency (tok/s on N GPUs / (N x tok/s
on one)), peak memory per GPU, the slowest of those intervals against the median (a stall the median does not show:
on 4 H200s, some runs lost a 5-step interval to 63-86% of the median's speed; docs/distributed.md), how long the
host waited for the GPUs at a log step (the median over the intervals: near 0, the host set the pace of the steps,
not the GPUs), and the forward SQNR of one quantized linear against its unquantized twin, as the run logged it
(qt.sqnr; flagged where a recipe's run did not quantize). Runs on fewer GPUs than the machine has go side by side on
disjoint GPUs (CUDA_VISIBLE_DEVICES); that shares the host's CPUs, not the GPUs. --repeats N runs each recipe and
GPU count N times, the recipes taking turns: a row then gives the median run's figures, every run's tok/s and each
run's speedup against the baseline's run of the same turn (bitnet's 2-GPU speedup varied from 0.90x to 1.10x between
runs where BF16's tok/s stayed within 2%: docs/scaling.md, rounds 24 and 25). A recipe given as 'NAME=VALUE ...
RECIPE --FLAG ...' runs with those environment variables (Inductor's, NCCL's, qt's) and llm_pretrain.py flags (after
--extra_args), so that variants of a recipe take turns in one invocation.

Resume (--resume_recipes): the resume config trains RESUME_STEPS steps uninterrupted on the most GPUs with a
checkpoint halfway; copies of its run directory cut back to that checkpoint then continue on each smaller GPU
count (the same global batch: --grad_accum makes up for the missing GPUs). The losses logged after the
checkpoint are compared with the uninterrupted run's.

Writes a markdown table (and a JSON of every run) to --output; the runs' directories go to --runs_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qt.sqnr import sqnr_cell  # noqa: E402
from qt.training.config import is_baseline  # noqa: E402
from scripts.compare_runs import load_run, summarize  # noqa: E402

RESUME_STEPS = 40


@dataclass
class Job:
    name: str
    recipe: str  # as given: RECIPE or RECIPE:OPTIONS_JSON
    gpus: int
    args: list[str]
    run_dir: Path
    after: list["Job"] = field(default_factory=list)
    prepare: object = None  # called just before the launch
    process: subprocess.Popen | None = None
    devices: list[int] = field(default_factory=list)
    started: float = 0.0
    status: int | None = None  # None: not run (time budget spent)
    repeat: int = 0  # which of --repeats runs of its recipe and GPU count


def command(job: Job) -> list[str]:
    if job.gpus == 1:
        return [sys.executable, "llm_pretrain.py", *job.args]
    return ["torchrun", "--standalone", "--nproc_per_node", str(job.gpus), "llm_pretrain.py", *job.args]


def run_jobs(jobs: list[Job], n_gpus: int, timeout_s: int, time_budget_s: float) -> None:
    """Runs the jobs, each on as many free GPUs as it needs, in the given order as far as GPUs and
    dependencies allow. No job starts after `time_budget_s` (those left are reported as not run)."""
    free, pending, running = list(range(n_gpus)), list(jobs), []
    deadline = time.time() + time_budget_s
    while pending or running:
        if time.time() > deadline and pending:
            print(f"-- time budget spent: {', '.join(job.name for job in pending)} not run", flush=True)
            pending.clear()
        for job in list(pending):
            if job.gpus <= len(free) and all(dep.status is not None for dep in job.after):
                if any(dep.status != 0 for dep in job.after):
                    job.status = -1
                    pending.remove(job)
                    print(f"-- {job.name}: skipped (a run it continues failed)", flush=True)
                    continue
                if job.prepare:
                    job.prepare()
                job.devices, free = free[: job.gpus], free[job.gpus:]
                env = dict(os.environ, **Spec.parse(job.recipe).env,
                           CUDA_VISIBLE_DEVICES=",".join(map(str, job.devices)))
                log = open(job.run_dir.parent / f"{job.run_dir.name}.log", "w")
                print(f"== {job.name} on GPUs {job.devices} ({time.strftime('%T')})", flush=True)
                job.process = subprocess.Popen(["timeout", "--signal=TERM", "--kill-after=30", str(timeout_s),
                                                *command(job)], cwd=REPO, env=env, stdout=log, stderr=log)
                job.started = time.time()
                pending.remove(job)
                running.append(job)
        for job in list(running):
            if job.process.poll() is not None:
                job.status = job.process.returncode
                free = sorted(free + job.devices)
                running.remove(job)
                print(f"-- {job.name}: exit {job.status} after {time.time() - job.started:.0f} s", flush=True)
        time.sleep(1)


ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")


@dataclass
class Spec:
    """A run's spec as --recipes gives it, '[NAME=VALUE ...] RECIPE[:OPTIONS_JSON] [--FLAG ...]' as in a shell:
    environment variables to set for the run, the recipe, its options, and more llm_pretrain.py flags."""
    env: dict[str, str]
    recipe: str
    options: str
    flags: list[str]

    @classmethod
    def parse(cls, spec: str) -> "Spec":
        head, _, flags = spec.partition(" --")
        words = head.split(" ")
        assignments = []
        while len(words) > 1 and ENV_ASSIGNMENT.fullmatch(words[0]):
            assignments.append(words.pop(0))
        recipe, _, options = " ".join(words).partition(":")
        return cls(dict(word.split("=", 1) for word in assignments), recipe, options,
                   shlex.split("--" + flags) if flags else [])

    def quantize_args(self) -> list[str]:
        return ["--quantize", self.recipe, *(["--quantize_kwargs", self.options] if self.options else [])]

    @property
    def is_baseline(self) -> bool:
        """The run compared with: the baseline recipe with no variables or flags of its own."""
        return is_baseline(self.recipe) and not (self.options or self.env or self.flags)


def dir_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_")


def scaling_jobs(args, per_gpu_batch: int) -> list[Job]:
    jobs = []
    for repeat in range(args.repeats):
        run = f"-run{repeat + 1}" if args.repeats > 1 else ""
        for recipe in args.recipes:
            for gpus in args.gpus:
                run_dir = args.runs_dir / "scaling" / f"{dir_name(recipe)}-{gpus}gpu{run}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                spec = Spec.parse(recipe)
                jobs.append(Job(f"{recipe} on {gpus} GPU(s){run}", recipe, gpus, [
                    "--config", str(args.config), "--dataset_dir", str(args.dataset_dir), *spec.quantize_args(),
                    "--batch_size", str(per_gpu_batch * gpus), "--run_dir", str(run_dir), "--no-save_checkpoints",
                    *args.extra_args, *spec.flags], run_dir, repeat=repeat))
    # Fewest GPUs first: the one-GPU runs pack side by side. Repeats take turns over the recipes, so a drift of the
    # machine's speed during the call reaches every recipe alike.
    return sorted(jobs, key=lambda job: (job.gpus, job.repeat))


def resume_jobs(args, global_batch: int) -> list[Job]:
    most, jobs = max(args.gpus), []
    half = RESUME_STEPS // 2
    common = ["--config", str(args.resume_config), "--dataset_dir", str(args.dataset_dir), "--n_steps",
              str(RESUME_STEPS), "--batch_size", str(global_batch), "--log_interval", "5", "--eval_interval", "0",
              "--ckpt_interval", str(half), "--keep_checkpoints", "2", "--save_checkpoints", *args.extra_args]
    for recipe in args.resume_recipes:
        whole_dir = args.runs_dir / "resume" / f"{dir_name(recipe)}-{most}gpu"
        shutil.rmtree(whole_dir.parent / whole_dir.name, ignore_errors=True)
        whole_dir.parent.mkdir(parents=True, exist_ok=True)
        spec = Spec.parse(recipe)
        whole = Job(f"{recipe}: {RESUME_STEPS} steps on {most} GPUs", recipe, most,
                    [*common, *spec.quantize_args(), *spec.flags, "--run_dir", str(whole_dir)], whole_dir)
        jobs.append(whole)
        for gpus in sorted(set(args.gpus) - {most}, reverse=True):
            run_dir = whole_dir.parent / f"{dir_name(recipe)}-{most}to{gpus}gpu"
            jobs.append(Job(f"{recipe}: resumed at step {half} on {gpus} GPU(s)", recipe, gpus,
                            ["--run_dir", str(run_dir), "--resume", "--grad_accum", str(most // gpus)], run_dir,
                            after=[whole], prepare=lambda src=whole_dir, dst=run_dir: cut_back(src, dst, half)))
    return jobs


def cut_back(source: Path, target: Path, step: int) -> None:
    """A copy of the run directory `source` as it was after its checkpoint at `step`."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    checkpoints = target / "checkpoints"
    keep = f"step_{step:08d}"
    for checkpoint in checkpoints.iterdir():
        if checkpoint.is_dir() and checkpoint.name != keep:
            shutil.rmtree(checkpoint)
    (checkpoints / "latest").write_text(keep)


def logged_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def outcome(status: int | None) -> str:
    return "not run (time budget)" if status is None else f"failed (exit {status})"


def run_figures(job: Job) -> dict:
    """One run's figures, from its metrics; only its status where it did not finish."""
    figures = {"status": job.status}
    if job.status == 0 and (job.run_dir / "metrics.jsonl").is_file():
        summary = summarize(load_run(job.run_dir))
        figures.update(tok_s=summary["tokens_per_second"], peak_memory_gb=summary["memory_gb"],
                       slowest_vs_median=summary["slowest_tokens_per_second"] / summary["tokens_per_second"],
                       forward_sqnr_db=summary["forward_sqnr_db"], host_wait_ms=summary["host_wait_ms"])
    return figures


def scaling_table(jobs: list[Job]) -> tuple[list[str], list[dict]]:
    """A row per recipe and GPU count. With several runs each (--repeats): the median run's tok/s, every run's, and
    each run's speedup against the baseline's run of the same turn; the largest peak memory, the slowest interval of
    any run."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for job in sorted(jobs, key=lambda job: job.repeat):
        runs.setdefault((job.recipe, job.gpus), []).append(run_figures(job))
    repeats = max(len(group) for group in runs.values())
    rows = []
    for (recipe, gpus), group in runs.items():
        done = [run for run in group if run.get("tok_s")]
        row = {"recipe": recipe, "gpus": gpus, "status": 0 if done else group[0]["status"]}
        if done:
            row.update(tok_s=statistics.median(run["tok_s"] for run in done),
                       peak_memory_gb=max(run["peak_memory_gb"] for run in done),
                       slowest_vs_median=min(run["slowest_vs_median"] for run in done),
                       forward_sqnr_db=done[0]["forward_sqnr_db"], runs=group,
                       host_wait_ms=statistics.median(run["host_wait_ms"] for run in done)
                       if all(run.get("host_wait_ms") is not None for run in done) else None)
        rows.append(row)
    one_gpu = {row["recipe"]: row["tok_s"] for row in rows if row["gpus"] == 1 and row.get("tok_s")}
    baseline = {row["gpus"]: row for row in rows if Spec.parse(row["recipe"]).is_baseline and row.get("tok_s")}
    header = ("| recipe | GPUs | tok/s | tok/s per GPU | scaling efficiency | vs the baseline on as many GPUs "
              "| peak memory per GPU (GB) | slowest interval / median | host wait at a log step (ms) "
              "| forward SQNR (dB) |")
    if repeats > 1:
        header += f" tok/s of each of {repeats} runs | vs the baseline, each run |"
    columns = header.count("|") - 1
    lines = [header, "| --- " + "| ---: " * (columns - 1) + "|"]
    for row in rows:
        if not row.get("tok_s"):
            lines.append(f"| {row['recipe']} | {row['gpus']} | {outcome(row['status'])} |" + " |" * (columns - 3))
            continue
        tok_s, gpus = row["tok_s"], row["gpus"]
        row["efficiency"] = tok_s / (gpus * one_gpu[row["recipe"]]) if row["recipe"] in one_gpu else None
        row["vs_baseline"] = tok_s / baseline[gpus]["tok_s"] if gpus in baseline else None
        line = (f"| {row['recipe']} | {gpus} | {tok_s:,.0f} | {tok_s / gpus:,.0f} "
                f"| {fmt(row['efficiency'], '.1%')} "
                f"| {fmt(row['vs_baseline'], '.2f')}x | {fmt(row.get('peak_memory_gb'), '.2f')} "
                f"| {row['slowest_vs_median']:.0%} | {fmt(row['host_wait_ms'], '.1f')} "
                f"| {sqnr_cell(row['forward_sqnr_db'], not is_baseline(Spec.parse(row['recipe']).recipe))} |")
        if repeats > 1:
            paired = zip(row["runs"], baseline[gpus]["runs"]) if gpus in baseline else []
            row["vs_baseline_runs"] = [run["tok_s"] / base["tok_s"] if run.get("tok_s") and base.get("tok_s")
                                       else None for run, base in paired]
            line += (" " + " / ".join(f"{run['tok_s']:,.0f}" if run.get("tok_s") else outcome(run["status"])
                                      for run in row["runs"]) + " | "
                     + " / ".join(fmt(speedup, ".2f") or "-" for speedup in row["vs_baseline_runs"]) + " |")
        lines.append(line)
    return lines, rows


def resume_table(jobs: list[Job]) -> tuple[list[str], list[dict]]:
    lines = ["| recipe | continued on | steps compared | max abs loss difference vs the uninterrupted run "
             "| losses (resumed / uninterrupted) |", "| --- | ---: | --- | ---: | --- |"]
    rows = []
    for job in jobs:
        if not job.after:
            continue
        whole = job.after[0]
        recipe = whole.recipe
        if job.status != 0:
            lines.append(f"| {recipe} | {job.gpus} GPU(s) | {outcome(job.status)} | | |")
            continue
        reference, resumed = logged_losses(whole.run_dir), logged_losses(job.run_dir)
        steps = sorted(s for s in resumed if s > RESUME_STEPS // 2 and s in reference)
        diff = max(abs(resumed[s] - reference[s]) for s in steps)
        pairs = ", ".join(f"{resumed[s]:.4f}/{reference[s]:.4f}" for s in steps)
        rows.append({"recipe": recipe, "gpus": job.gpus, "steps": steps, "max_abs_diff": diff})
        lines.append(f"| {recipe} | {job.gpus} GPU(s) | {steps[0]}-{steps[-1]} | {diff:.2e} | {pairs} |")
    return lines, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs/runs/throughput_tinyllama.yaml")
    parser.add_argument("--dataset_dir", type=Path, required=True)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--recipes", nargs="*", default=["bf16", "int8_mixed_precision"],
                        help='RECIPE or RECIPE:OPTIONS_JSON, e.g. \'int8_mixed_precision:{"int8_all_gather": true}\', '
                        'with environment variables before it and llm_pretrain.py flags after it for its runs, e.g. '
                        '\'NCCL_MAX_CTAS=8 bitnet --fsdp_unit_blocks 4\' (the baseline: bf16 or none with neither)')
    parser.add_argument("--resume_config", type=Path, default=REPO / "configs/runs/convergence_120m.yaml")
    parser.add_argument("--resume_recipes", nargs="*", default=[])
    parser.add_argument("--runs_dir", type=Path, default=Path("runs/bench_scaling"))
    parser.add_argument("--output", type=Path, default=REPO / "docs/scaling.md")
    parser.add_argument("--timeout_s", type=int, default=300, help="limit of each run")
    parser.add_argument("--time_budget_s", type=float, default=float("inf"), help="start no run after this")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each recipe and GPU count, in turns; the table gives the median and each run")
    parser.add_argument("--cpu_processes", type=int, default=0,
                        help="without a GPU: run on this many CPU processes (gloo), to try the script on a tiny config")
    parser.add_argument("--extra_args", nargs=argparse.REMAINDER, default=[], help="more llm_pretrain.py flags")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats {args.repeats}: give 1 or more runs of each recipe and GPU count")
    import torch

    n_gpus = torch.cuda.device_count() or args.cpu_processes
    if max(args.gpus) > n_gpus:
        raise SystemExit(f"error: --gpus {max(args.gpus)} but this machine has {n_gpus} GPU(s) (--cpu_processes "
                         "on a machine without one)")
    per_gpu_batch = yaml.safe_load(args.config.read_text())["batch_size"]
    scaling = scaling_jobs(args, per_gpu_batch) if args.recipes else []
    resume_batch = yaml.safe_load(args.resume_config.read_text())["batch_size"]
    resume = resume_jobs(args, resume_batch) if args.resume_recipes else []
    # The resume first: its runs wait on one another, and the scaling runs fill the GPUs it leaves free.
    run_jobs(resume + scaling, n_gpus, args.timeout_s, args.time_budget_s)

    device = (f"{n_gpus} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else
              f"{n_gpus} CPU processes") + f", torch {torch.__version__}"
    lines = [f"Command: `{' '.join(sys.argv)}`", "", f"Machine: {device}.", ""]
    results = {"device": device, "argv": sys.argv}
    if scaling:
        table, results["scaling"] = scaling_table(scaling)
        lines += [f"Scaling: {args.config.name}, {per_gpu_batch} sequences per GPU.", "", *table, ""]
    if resume:
        table, results["resume"] = resume_table(resume)
        lines += [f"Resume on fewer GPUs: {args.resume_config.name}, {RESUME_STEPS} steps, checkpoint at step "
                  f"{RESUME_STEPS // 2}, same global batch.", "", *table, ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
