"""Compare training runs: a PNG of training and validation loss against tokens, and a markdown table.

    python scripts/compare_runs.py runs/tiny-none runs/tiny-int8_mixed_precision --output_dir runs/compare \
        --dataset_dir data/quickstart

Reads each run directory's metrics.jsonl and config.yaml; a run directory without metrics.jsonl is read from
the wandb offline runs inside it (RUN_DIR/wandb/offline-run-*/, a resumed run's segments joined), and an
offline-run folder can be named directly. The baseline is the run with --quantize none (else the first run).
With --dataset_dir, the table also gives the unigram entropy of the training tokens.
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

from qt.training.config import ConfigError, one_line_errors  # noqa: E402
from qt.training.data import TokenShards, unigram_entropy  # noqa: E402


def load_run(run_dir: Path) -> dict:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return load_wandb_offline_run(run_dir)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        raise ConfigError(f"{metrics} is empty: the run logged nothing yet")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    return {"name": run_dir.name, "recipe": config.get("quantize", "?"), "records": records}


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
    return {"name": path.name, "recipe": config.get("quantize", "?"), "records": records}


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
    return {"loss": train[-1]["loss"] if train else None, "val_loss": val[-1]["val_loss"] if val else None,
            "tokens": run["records"][-1]["tokens_seen"], "tokens_per_second": statistics.median(speeds) if speeds else None,
            "memory_gb": max(memory) if memory else None}


def markdown_table(runs: list[dict], baseline: dict) -> str:
    base = summarize(baseline)

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    rows = ["| run | recipe | tokens | final loss | final val loss | val loss vs baseline | tok/s | speedup | "
            "peak memory (GB) |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = summarize(run)
        delta = (s["val_loss"] - base["val_loss"]) if None not in (s["val_loss"], base["val_loss"]) else None
        speedup = (s["tokens_per_second"] / base["tokens_per_second"]
                   if None not in (s["tokens_per_second"], base["tokens_per_second"]) else None)
        rows.append(f"| {run['name']} | {run['recipe']} | {s['tokens']:,} | {fmt(s['loss'], '.4f')} | "
                    f"{fmt(s['val_loss'], '.4f')} | {fmt(delta, '+.4f')} | {fmt(s['tokens_per_second'], ',.0f')} | "
                    f"{fmt(speedup, '.2f')}x | {fmt(s['memory_gb'], '.2f')} |")
    return "\n".join(rows)


def plot(runs: list[dict], path: Path, entropy: float | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "loss", "training loss"), (axes[1], "val_loss", "validation loss")):
        for run in runs:
            points = [(r["tokens_seen"], r[key]) for r in run["records"] if r.get(key) is not None]
            if points:
                label = run["name"] if run["name"] == run["recipe"] else f"{run['name']} ({run['recipe']})"
                ax.plot(*zip(*points), label=label, marker="." if key == "val_loss" else None)
        if entropy is not None:
            ax.axhline(entropy, color="gray", linestyle="--", label="unigram entropy")
        ax.set(xlabel="tokens", ylabel="loss (nats/token)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--output_dir", type=Path, required=True, help="where comparison.md and loss_curves.png go")
    p.add_argument("--dataset_dir", help="the runs' dataset folder, to report its unigram entropy")
    args = p.parse_args(argv)
    runs = [load_run(d) for d in args.run_dirs]
    baseline = next((r for r in runs if r["recipe"] == "none"), runs[0])
    entropy = unigram_entropy(TokenShards(args.dataset_dir, "train")) if args.dataset_dir else None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report = markdown_table(runs, baseline)
    if entropy is not None:
        report += (f"\n\nUnigram entropy of the training tokens: {entropy:.4f} nats/token (the loss of a model that "
                   f"knows only token frequencies).")
    report += f"\n\nBaseline: {baseline['name']}."
    try:
        plot(runs, args.output_dir / "loss_curves.png", entropy)
        report += " ![loss curves](loss_curves.png)"
    except ImportError:
        print("no plot: pip install matplotlib", file=sys.stderr)
    (args.output_dir / "comparison.md").write_text(report + "\n")
    print(report)
    return report + "\n"


if __name__ == "__main__":
    main()
