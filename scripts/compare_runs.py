"""Compare training runs: a markdown table and a figure (loss curves, loss minus the baseline's, speed, memory).

    python scripts/compare_runs.py runs/tiny-none runs/tiny-int8_mixed_precision --output_dir runs/compare \
        --dataset_dir data/quickstart

Reads each run directory's metrics.jsonl and config.yaml; a run directory without metrics.jsonl is read from
the wandb offline runs inside it (RUN_DIR/wandb/offline-run-*/, a resumed run's segments joined), and an
offline-run folder can be named directly. A folder named twice counts once. The baseline (the reference of
every delta and speedup) is the first run without a recipe, else the first run; it is called by the dtype it
computed in, bf16 or fp32. With --dataset_dir, the table also gives the unigram entropy of the training tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing qt

import torch  # noqa: E402

from qt.sqnr import NOT_QUANTIZED_DB, sqnr_cell  # noqa: E402
from qt.training.config import ConfigError, is_baseline, one_line_errors  # noqa: E402
from qt.training.data import TokenShards, unigram_entropy  # noqa: E402
from qt.training.metrics import recipe_label  # noqa: E402


def load_run(run_dir: Path) -> dict:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return load_wandb_offline_run(run_dir)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        raise ConfigError(f"{metrics} is empty: the run logged nothing yet")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    return described_run(run_dir.name, config, records)


def described_run(name: str, config: dict, records: list[dict]) -> dict:
    """A run with `quantize` (its --quantize, "?" when its config is lost) and `recipe`, its name in tables and
    plots: the recipe, or the baseline's compute dtype. The loop logs GPU memory only on a GPU, which tells
    where --dtype auto ran."""
    quantize = config.get("quantize", "?")
    device = torch.device("cuda" if any(r.get("max_memory_allocated_gb") is not None for r in records) else "cpu")
    return {"name": name, "quantize": quantize, "recipe": recipe_label(quantize, config.get("dtype", "auto"), device),
            "records": records}


def load_wandb_offline_run(path: Path) -> dict:
    """A run from its wandb offline files: PATH is an offline-run folder, or a run directory holding them
    (one per session of a resumed run: each later segment replaces what the earlier ones logged from its
    first step on, as metrics.jsonl does)."""
    files = sorted(path.glob("run-*.wandb")) or sorted(path.glob("wandb/offline-run-*/run-*.wandb"))
    if not files:
        raise ConfigError(f"{path} has no metrics.jsonl and no wandb offline run; is it a run directory of "
                          f"llm_pretrain.py?")
    records, config = [], {}
    for file in files:  # offline-run-YYYYMMDD_HHMMSS-ID: name order is time order
        segment = []
        for kind, message in read_wandb_records(file):
            if kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in message.item}
                segment.append({k: v for k, v in row.items() if not k.startswith("_")})
            elif kind in ("run", "config"):
                update = message.config.update if kind == "run" else message.update
                config.update({item.key: json.loads(item.value_json) for item in update})
        if segment:
            records = [r for r in records if r["step"] < segment[0]["step"]] + segment
    if not records:
        raise ConfigError(f"the wandb offline run in {path} logged nothing yet")
    return described_run(path.name, config, records)


def read_wandb_records(path: Path):
    """(record type, message) of each record of a wandb `.wandb` file: protobuf `Record`s in a LevelDB log
    (a 7-byte file header, then 32 KiB blocks of chunks: crc32 u32, length u16, type u8 (1 full, 2 first,
    3 middle, 4 last), data). wandb's own reader left the Python package, so this is the format's reader."""
    from wandb.proto import wandb_internal_pb2

    block, chunk_header = 32768, 7
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ConfigError(f"{path} is not a wandb run file")
    position, pieces = 7, []
    while position + chunk_header <= len(data):
        left_in_block = block - position % block
        if left_in_block < chunk_header:  # a block's zero-filled trailer
            position += left_in_block
            continue
        _, length, chunk_type = struct.unpack_from("<IHB", data, position)
        if chunk_type == 0:  # zero padding at the end of a file still being written
            break
        pieces.append(data[position + chunk_header:position + chunk_header + length])
        position += chunk_header + length
        if chunk_type in (1, 4):
            record = wandb_internal_pb2.Record.FromString(b"".join(pieces))
            pieces = []
            kind = record.WhichOneof("record_type")
            yield kind, getattr(record, kind) if kind else None


def summarize(run: dict) -> dict:
    train = [r for r in run["records"] if "loss" in r]
    val = [r for r in run["records"] if r.get("val_loss") is not None]
    # The first interval includes compilation and warmup: leave it out of the speed when there are others.
    speeds = [r["tokens_per_second"] for r in train[1:] or train]
    memory = [r["max_memory_allocated_gb"] for r in train if r.get("max_memory_allocated_gb") is not None]
    sqnr = [r["forward_sqnr_db"] for r in run["records"] if r.get("forward_sqnr_db") is not None]
    waits = [r["host_wait_ms"] for r in train[1:] or train if r.get("host_wait_ms") is not None]
    return {"loss": train[-1]["loss"] if train else None, "val_loss": val[-1]["val_loss"] if val else None,
            "tokens": run["records"][-1]["tokens_seen"], "tokens_per_second": statistics.median(speeds) if speeds else None,
            "slowest_tokens_per_second": min(speeds) if speeds else None,
            "memory_gb": max(memory) if memory else None, "forward_sqnr_db": sqnr[-1] if sqnr else None,
            "host_wait_ms": statistics.median(waits) if waits else None}


def label(run: dict) -> str:
    return run["name"] if run["name"] == run["recipe"] else f"{run['name']} ({run['recipe']})"


SQNR_NOTE = ("Forward SQNR: one quantized linear's output against its float64 twin, at the start of the run "
             f"(qt.sqnr); {NOT_QUANTIZED_DB:.0f} dB or more is no more than rounding to BF16: that run did not "
             "quantize.")


def markdown_table(runs: list[dict], baseline: dict) -> str:
    base = summarize(baseline)

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    rows = ["| run | recipe | tokens | final loss | final val loss | val loss vs baseline | tok/s | speedup | "
            "peak memory (GB) | forward SQNR (dB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = summarize(run)
        delta = (s["val_loss"] - base["val_loss"]) if None not in (s["val_loss"], base["val_loss"]) else None
        speedup = (s["tokens_per_second"] / base["tokens_per_second"]
                   if None not in (s["tokens_per_second"], base["tokens_per_second"]) else None)
        rows.append(f"| {run['name']} | {run['recipe']} | {s['tokens']:,} | {fmt(s['loss'], '.4f')} | "
                    f"{fmt(s['val_loss'], '.4f')} | {fmt(delta, '+.4f')} | {fmt(s['tokens_per_second'], ',.0f')} | "
                    f"{fmt(speedup, '.2f')}x | {fmt(s['memory_gb'], '.2f')} | "
                    f"{sqnr_cell(s['forward_sqnr_db'], not is_baseline(run['quantize']))} |")
    return "\n".join(rows)


def curve(run: dict, key: str) -> dict[int, float]:
    """tokens seen -> the run's `key` wherever it was logged."""
    return {r["tokens_seen"]: r[key] for r in run["records"] if r.get(key) is not None}


def loss_gaps(runs: list[dict], baseline: dict) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """(the loss compared, run name -> [(tokens, its loss minus the baseline's)]) at the token counts where
    both logged it: the validation loss where every run shares two evaluations with the baseline, else the
    training loss."""
    for key in ("val_loss", "loss"):
        base = curve(baseline, key)
        gaps = {run["name"]: [(t, loss - base[t]) for t, loss in curve(run, key).items() if t in base]
                for run in runs if run is not baseline}
        if key == "loss" or all(len(points) >= 2 for points in gaps.values()):
            return key, gaps


def plot(runs: list[dict], baseline: dict, path: Path, entropy: float | None, note: str | None) -> None:
    """Training and validation loss vs tokens; the loss minus the baseline's (where curves that overlap
    differ); median throughput and peak GPU memory per run. One colour a run, one legend for all panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    colors = {run["name"]: f"C{i}" for i, run in enumerate(runs)}
    fig, ((train_ax, val_ax, gap_ax), (speed_ax, memory_ax, legend_ax)) = plt.subplots(2, 3, figsize=(16, 9))
    for ax, key, title in ((train_ax, "loss", "training loss"), (val_ax, "val_loss", "validation loss")):
        for run in runs:
            points = sorted(curve(run, key).items())
            if points:
                ax.plot(*zip(*points), color=colors[run["name"]], label=label(run),
                        marker="." if key == "val_loss" else None)
        if entropy is not None:
            ax.axhline(entropy, color="gray", linestyle="--", label="unigram entropy of the data")
        ax.set(title=title, xlabel="training tokens", ylabel="loss (nats/token)")
    # The first tenth of training falls steeply from the initial loss: zoom on the rest, where runs differ.
    last_tokens = max(max(curve(run, "loss"), default=0) for run in runs)
    later = [loss for run in runs for t, loss in curve(run, "loss").items() if t >= last_tokens / 10]
    if later:
        low, high = min(later), max(later + ([entropy] if entropy is not None else []))
        train_ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))

    key, gaps = loss_gaps(runs, baseline)
    gap_ax.axhline(0, color=colors[baseline["name"]])
    for run in runs:
        if gaps.get(run["name"]):
            gap_ax.plot(*zip(*gaps[run["name"]]), color=colors[run["name"]], marker="." if key == "val_loss" else None)
    which = "validation" if key == "val_loss" else "training"
    gap_ax.set(title=f"{which} loss minus {baseline['recipe']}'s (below 0: better)", xlabel="training tokens",
               ylabel="loss difference (nats/token)")
    for ax in (train_ax, val_ax, gap_ax):
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)

    summaries = [summarize(run) for run in runs]
    base = summarize(baseline)
    bar_panel(speed_ax, runs, colors, [s["tokens_per_second"] for s in summaries], base["tokens_per_second"],
              "training throughput (median of the logged intervals)", "tokens / second", "{:,.0f}")
    bar_panel(memory_ax, runs, colors, [s["memory_gb"] for s in summaries], base["memory_gb"],
              "peak GPU memory (max allocated)", "GB", "{:.2f} GB", missing="no GPU memory logged (CPU runs)")

    handles, labels = train_ax.get_legend_handles_labels()
    legend_ax.axis("off")
    legend_ax.legend(handles, labels, loc="center", title=f"runs; the baseline is {label(baseline)}", fontsize=10,
                     title_fontsize=10, frameon=False)
    if note:
        fig.suptitle(note)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_panel(ax, runs, colors, values, base_value, title, ylabel, value_format, missing="not logged"):
    """One bar a run, labelled with its value and its ratio to the baseline's."""
    from matplotlib.ticker import EngFormatter
    shown = [(run, value) for run, value in zip(runs, values) if value is not None]
    if not shown:
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}:\n{missing}", ha="center", va="center", transform=ax.transAxes)
        return
    bars = ax.bar([label(run) for run, _ in shown], [value for _, value in shown],
                  color=[colors[run["name"]] for run, _ in shown])
    ax.bar_label(bars, [value_format.format(value) + (f"\n{value / base_value:.2f}x" if base_value else "")
                        for _, value in shown], fontsize=9)
    ax.set(title=title, ylabel=ylabel)
    ax.margins(y=0.2)
    ax.tick_params(axis="x", labelrotation=20)
    ax.yaxis.set_major_formatter(EngFormatter())
    ax.grid(axis="y", alpha=0.3)


def run_folders(run_dirs: list[Path], runs_in: list[Path]) -> list[Path]:
    """The run folders named, then those inside each --runs_in folder (name order), each once."""
    found = [*run_dirs, *(d for parent in runs_in for d in sorted(parent.iterdir()) if (d / "metrics.jsonl").is_file())]
    if not found:
        raise ConfigError("no runs to compare: name run folders, or --runs_in a folder that holds some")
    unique = {}
    for run_dir in found:
        unique.setdefault(run_dir.resolve(), run_dir)
    return list(unique.values())


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="*", type=Path, help="run folders (llm_pretrain.py --run_dir)")
    p.add_argument("--runs_in", nargs="+", type=Path, default=[], metavar="DIR",
                   help="also every run folder in DIR (a sweep's or the quickstart's output folder)")
    p.add_argument("--output_dir", type=Path, required=True, help="where comparison.md and loss_curves.png go")
    p.add_argument("--dataset_dir", help="the runs' dataset folder, to report its unigram entropy")
    p.add_argument("--note", help="a line above the table and the figure, e.g. how the runs were made")
    args = p.parse_args(argv)
    runs = [load_run(d) for d in run_folders(args.run_dirs, args.runs_in)]
    baseline = next((r for r in runs if is_baseline(r["quantize"])), runs[0])
    runs.remove(baseline)
    runs.insert(0, baseline)
    entropy = unigram_entropy(TokenShards(args.dataset_dir, "train")) if args.dataset_dir else None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report = (f"{args.note}\n\n" if args.note else "") + markdown_table(runs, baseline) + f"\n\n{SQNR_NOTE}"
    if entropy is not None:
        report += (f"\n\nUnigram entropy of the training tokens: {entropy:.4f} nats/token (the loss of a model that "
                   f"knows only token frequencies).")
    report += f"\n\nBaseline: {label(baseline)}."
    try:
        plot(runs, baseline, args.output_dir / "loss_curves.png", entropy, args.note)
        report += " ![loss curves, loss minus the baseline's, speed and memory](loss_curves.png)"
    except ImportError:
        print("no plot: pip install matplotlib", file=sys.stderr)
    (args.output_dir / "comparison.md").write_text(report + "\n")
    print(report)
    return report + "\n"


if __name__ == "__main__":
    main()
